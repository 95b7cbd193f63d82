package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// cmdHold: -n derphttp clients (tailscaled's NewRegionClient) connect to one
// server and relay to each other in pairs, one small sequence-numbered packet
// per -interval each way, until -stop-file exists or -max passes. It proves a
// server change under them (a certificate renewal) dropped nobody: every
// client keeps its first connection (same connection generation and local
// port), nothing is lost or reordered, and no receive error happens. It also
// records which certificate each connection got.
func cmdHold(args []string) {
	fs := flag.NewFlagSet("hold", flag.ExitOnError)
	name := fs.String("name", "hold", "check name prefix")
	mapFile := fs.String("map", "", "DERP map")
	n := fs.Int("n", 20, "clients (an even number)")
	interval := fs.Duration("interval", 50*time.Millisecond, "send interval per client")
	maxDur := fs.Duration("max", 120*time.Second, "run at most this long")
	minDur := fs.Duration("min", 2*time.Second, "run at least this long")
	readyFile := fs.String("ready-file", "", "created once every client relays")
	stopFile := fs.String("stop-file", "", "stop when this file exists")
	fs.Parse(args)
	if *n < 2 || *n%2 != 0 {
		fatalf("hold: -n must be even and at least 2")
	}
	reg := loadRegion(*mapFile, 0)
	type peer struct {
		c        *derphttp.Client
		gen0     int
		local0   string
		leaf0    string
		sent     atomic.Uint64
		got      atomic.Uint64
		bad      atomic.Uint64
		errs     atomic.Uint64
		gens     atomic.Int64 // connection generations seen after the first
		lastSeq  uint64
		firstErr atomic.Value
	}
	ps := make([]*peer, *n)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t0 := time.Now()
	for i := range ps {
		p := &peer{c: regionClient(key.NodePrivate{}, reg, nil)}
		if err := p.c.Connect(ctx); err != nil {
			fatalf("client %d connect: %v", i, err)
		}
		la, _ := p.c.LocalAddr()
		p.local0 = la.String()
		if st, ok := p.c.TLSConnectionState(); ok && len(st.PeerCertificates) > 0 {
			p.leaf0 = certID(st.PeerCertificates[0])
		}
		ps[i] = p
	}
	connectTook := time.Since(t0)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i, p := range ps {
		partner := ps[i^1]
		wg.Add(2)
		go func() { // receiver
			defer wg.Done()
			first := true
			for {
				m, gen, err := p.c.RecvDetail()
				if err != nil {
					select {
					case <-stop:
						return
					default:
					}
					p.errs.Add(1)
					p.firstErr.CompareAndSwap(nil, err.Error())
					time.Sleep(50 * time.Millisecond)
					continue
				}
				if first {
					p.gen0, first = gen, false
				} else if gen != p.gen0 {
					p.gens.Add(1)
					p.gen0 = gen
				}
				pkt, ok := m.(derp.ReceivedPacket)
				if !ok || len(pkt.Data) < 8 {
					continue
				}
				seq := binary.BigEndian.Uint64(pkt.Data)
				if seq != p.lastSeq+1 {
					p.bad.Add(1)
				}
				p.lastSeq = seq
				p.got.Add(1)
			}
		}()
		go func() { // sender
			defer wg.Done()
			var b [64]byte
			tick := time.NewTicker(*interval)
			defer tick.Stop()
			for seq := uint64(1); ; seq++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				binary.BigEndian.PutUint64(b[:], seq)
				if err := p.c.Send(partner.c.SelfPublicKey(), b[:]); err != nil {
					p.errs.Add(1)
					p.firstErr.CompareAndSwap(nil, "send: "+err.Error())
				}
				p.sent.Add(1)
			}
		}()
	}
	// Ready once every client has received something.
	readyBy := time.Now().Add(15 * time.Second)
	for time.Now().Before(readyBy) {
		all := true
		for _, p := range ps {
			if p.got.Load() == 0 {
				all = false
			}
		}
		if all {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if *readyFile != "" {
		os.WriteFile(*readyFile, nil, 0o644)
	}
	start := time.Now()
	for {
		el := time.Since(start)
		if el >= *maxDur {
			break
		}
		if el >= *minDur && *stopFile != "" {
			if _, err := os.Stat(*stopFile); err == nil {
				break
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Let the last packets land, then stop the senders and close.
	close(stop)
	time.Sleep(300 * time.Millisecond)
	held := time.Since(start)
	var sent, got, bad, errs, regen uint64
	moved, leaves := 0, map[string]int{}
	for _, p := range ps {
		sent += p.sent.Load()
		got += p.got.Load()
		bad += p.bad.Load()
		errs += p.errs.Load()
		regen += uint64(p.gens.Load())
		la, _ := p.c.LocalAddr()
		if la.String() != p.local0 {
			moved++
		}
		leaves[p.leaf0]++
	}
	for _, p := range ps {
		p.c.Close()
	}
	wg.Wait()
	firstErr := ""
	for _, p := range ps {
		if e, ok := p.firstErr.Load().(string); ok {
			firstErr = e
			break
		}
	}
	check(*name+"/connected", true, "%d clients connected in %v", *n, connectTook.Round(time.Millisecond))
	check(*name+"/no-drops", moved == 0 && regen == 0 && errs == 0,
		"held %v: %d of %d clients on their first connection (same local port), %d reconnects, %d send/receive errors%s",
		held.Round(100*time.Millisecond), *n-moved, *n, regen, errs, map[bool]string{true: " (first: " + firstErr + ")", false: ""}[firstErr != ""])
	// The last few packets may still be in flight when the senders stop.
	check(*name+"/relayed", bad == 0 && got > 0 && sent-got <= uint64(*n)*2,
		"%d packets sent, %d received in order, %d out of sequence", sent, got, bad)
	fmt.Printf("hold: certificates at connect: %v\n", leaves)
}

// certID names a certificate: serial, expiry and SHA-256 prefix.
func certID(c *x509.Certificate) string {
	h := sha256.Sum256(c.Raw)
	return fmt.Sprintf("serial=%x notAfter=%s sha256=%s", c.SerialNumber, c.NotAfter.UTC().Format(time.RFC3339), hex.EncodeToString(h[:8]))
}

// cmdCertInfo: one TLS handshake as a Tailscale client makes it (Go's
// crypto/tls, SNI -sni, roots from -ca or the system), and the served leaf.
func cmdCertInfo(args []string) {
	fs := flag.NewFlagSet("certinfo", flag.ExitOnError)
	addr := fs.String("addr", "", "host:port")
	sni := fs.String("sni", "", "server name (also the name verified)")
	caFile := fs.String("ca", "", "PEM roots (default: the system's)")
	fs.Parse(args)
	cfg := &tls.Config{ServerName: *sni, NextProtos: []string{"http/1.1"}}
	if *caFile != "" {
		b, err := os.ReadFile(*caFile)
		if err != nil {
			fatalf("%v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			fatalf("%s: no certificates", *caFile)
		}
		cfg.RootCAs = pool
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", *addr, cfg)
	if err != nil {
		fmt.Printf("error: %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()
	st := conn.ConnectionState()
	fmt.Println(certID(st.PeerCertificates[0]))
	os.Exit(0)
}
