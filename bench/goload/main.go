// Command goload is the cross-check for derp-bench: the same relay measurement (N client
// pairs, A sends to B, at most -window packets in flight per pair, send time in the first 8
// bytes of each packet) built on Tailscale's own derphttp client instead of ours. It prints
// one JSON object like derp-bench relay's "load" section.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

type result struct {
	Client   string  `json:"client"`
	Pairs    int     `json:"pairs"`
	Size     int     `json:"size"`
	Window   int     `json:"window"`
	Packets  int64   `json:"packets"`
	PPS      float64 `json:"pps"`
	MBPerS   float64 `json:"mb_per_s"`
	P50us    float64 `json:"p50_us"`
	P99us    float64 `json:"p99_us"`
	Lost     int64   `json:"lost"`
	Duration float64 `json:"seconds"`
}

func main() {
	url := flag.String("url", "", "DERP URL, https://127.0.0.1:PORT/derp")
	caFile := flag.String("ca-file", "", "PEM CA that signed the server certificate")
	pairs := flag.Int("pairs", 8, "client pairs")
	size := flag.Int("size", 1024, "packet size (16..65536)")
	window := flag.Int("window", 24, "packets in flight per pair")
	warmup := flag.Duration("warmup", time.Second, "warm-up before measuring")
	duration := flag.Duration("duration", 5*time.Second, "measurement window")
	flag.Parse()
	if *url == "" || *size < 16 || *size > derp.MaxPacketSize || *pairs < 1 || *window < 1 {
		fmt.Fprintln(os.Stderr, "goload: need -url, 16 <= -size <= 65536, -pairs >= 1, -window >= 1")
		os.Exit(2)
	}
	time.AfterFunc(*warmup+*duration+60*time.Second, func() {
		fmt.Fprintln(os.Stderr, "goload: overall timeout")
		os.Exit(1)
	})
	var roots *x509.CertPool
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			fatal(err)
		}
		roots = x509.NewCertPool()
		roots.AppendCertsFromPEM(pem)
	}
	connect := func() *derphttp.Client {
		c, err := derphttp.NewClient(key.NewNode(), *url, logger.Discard, netmon.NewStatic())
		if err != nil {
			fatal(err)
		}
		if roots != nil {
			c.TLSConfig = &tls.Config{RootCAs: roots}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := c.Connect(ctx); err != nil {
			fatal(err)
		}
		return c
	}
	type pair struct {
		a, b     *derphttp.Client
		received atomic.Int64
		progress chan struct{}
	}
	ps := make([]*pair, *pairs)
	for i := range ps {
		ps[i] = &pair{a: connect(), b: connect(), progress: make(chan struct{}, 1)}
	}
	base := time.Now()
	t0 := base.Add(*warmup)
	t1 := t0.Add(*duration)
	var (
		mu       sync.Mutex
		lats     []int64
		packets  atomic.Int64
		bytes    atomic.Int64
		lost     atomic.Int64
		stopping atomic.Bool
		wg       sync.WaitGroup
	)
	for _, p := range ps {
		wg.Add(2)
		go func() { // receiver
			defer wg.Done()
			var local []int64
			defer func() { mu.Lock(); lats = append(lats, local...); mu.Unlock() }()
			for !stopping.Load() {
				m, err := p.b.Recv()
				if err != nil {
					return
				}
				rp, ok := m.(derp.ReceivedPacket)
				if !ok {
					continue
				}
				now := time.Now()
				p.received.Add(1)
				select {
				case p.progress <- struct{}{}:
				default:
				}
				if now.Before(t0) || !now.Before(t1) || len(rp.Data) < 16 {
					continue
				}
				sent := int64(binary.BigEndian.Uint64(rp.Data[:8]))
				local = append(local, now.Sub(base).Nanoseconds()-sent)
				packets.Add(1)
				bytes.Add(int64(len(rp.Data)))
			}
		}()
		go func() { // sender
			defer wg.Done()
			pkt := make([]byte, *size)
			dst := p.b.SelfPublicKey()
			var sent, lostHere, seq int64
			for !stopping.Load() {
				if sent-p.received.Load()-lostHere >= int64(*window) {
					select {
					case <-p.progress:
					case <-time.After(500 * time.Millisecond):
						r := p.received.Load()
						lostHere = sent - r
					}
					continue
				}
				binary.BigEndian.PutUint64(pkt, uint64(time.Since(base).Nanoseconds()))
				binary.BigEndian.PutUint64(pkt[8:], uint64(seq))
				seq++
				if err := p.a.Send(dst, pkt); err != nil {
					return
				}
				sent++
			}
			lost.Add(lostHere)
		}()
	}
	time.Sleep(time.Until(t1))
	stopping.Store(true)
	for _, p := range ps {
		p.a.Close()
		p.b.Close()
	}
	wg.Wait()
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	q := func(f float64) float64 {
		if len(lats) == 0 {
			return 0
		}
		i := int(float64(len(lats))*f + 0.5)
		if i >= len(lats) {
			i = len(lats) - 1
		}
		return float64(lats[i]) / 1e3
	}
	secs := duration.Seconds()
	out, _ := json.Marshal(result{
		Client: "go-derphttp", Pairs: *pairs, Size: *size, Window: *window,
		Packets: packets.Load(), PPS: float64(packets.Load()) / secs,
		MBPerS: float64(bytes.Load()) / secs / 1e6, P50us: q(0.5), P99us: q(0.99),
		Lost: lost.Load(), Duration: secs,
	})
	fmt.Println(string(out))
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "goload:", err)
	os.Exit(1)
}
