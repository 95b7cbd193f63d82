package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// cmdFlood opens -n connections, -conc at a time, cycling through four kinds:
//
//	good     a real derphttp client: TLS, upgrade, ClientInfo, ServerInfo, Ping, close
//	badinfo  TLS + fast-start upgrade, then a ClientInfo whose box does not open
//	garbage  random bytes instead of a TLS ClientHello
//	cut      a TLS record header promising 16 KiB, then a reset
//
// so half of them are garbage at the TLS layer and one in four fails the DERP
// handshake. Every bad connection must be closed by the server (EOF or reset
// within 10 s), every good one must be served.
func cmdFlood(args []string) {
	fs := flag.NewFlagSet("flood", flag.ExitOnError)
	name := fs.String("name", "flood", "check name")
	mapFile := fs.String("map", "", "DERP map (for the good clients)")
	addr := fs.String("addr", "", "host:port")
	n := fs.Int("n", 4000, "connections")
	conc := fs.Int("conc", 32, "concurrent connections")
	fs.Parse(args)
	reg := loadRegion(*mapFile, 0)
	kinds := []string{"good", "badinfo", "garbage", "cut"}
	var ok, bad [4]atomic.Int64
	var errMu sync.Mutex
	firstErr := map[string]string{}
	note := func(k int, err error) {
		if err == nil {
			ok[k].Add(1)
			return
		}
		bad[k].Add(1)
		errMu.Lock()
		if _, seen := firstErr[kinds[k]]; !seen {
			firstErr[kinds[k]] = err.Error()
		}
		errMu.Unlock()
	}
	var next atomic.Int64
	var lat []time.Duration
	var latMu sync.Mutex
	t0 := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= *n {
					return
				}
				k := i % 4
				s := time.Now()
				var err error
				switch k {
				case 0:
					err = floodGood(reg)
				case 1:
					err = floodBadInfo(*addr)
				case 2:
					err = floodGarbage(*addr)
				case 3:
					err = floodCut(*addr)
				}
				if k == 0 {
					latMu.Lock()
					lat = append(lat, time.Since(s))
					latMu.Unlock()
				}
				note(k, err)
			}
		}()
	}
	wg.Wait()
	el := time.Since(t0)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	var total, nbad int64
	detail := ""
	for k := range kinds {
		total += ok[k].Load() + bad[k].Load()
		nbad += bad[k].Load()
		detail += fmt.Sprintf("%s %d/%d, ", kinds[k], ok[k].Load(), ok[k].Load()+bad[k].Load())
	}
	p50, p99 := time.Duration(0), time.Duration(0)
	if len(lat) > 0 {
		p50, p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	}
	check(*name, nbad == 0, "%d connections in %v (%.0f/s, %d at a time): %sas expected; good-client connect+ping p50 %s p99 %s%s",
		total, el.Round(time.Millisecond), float64(total)/el.Seconds(), *conc, detail, ms(p50), ms(p99), errSummary(firstErr))
}

func errSummary(m map[string]string) string {
	s := ""
	for k, v := range m {
		s += fmt.Sprintf("; first %s error: %s", k, v)
	}
	return s
}

func floodGood(reg *tailcfg.DERPRegion) error {
	c := regionClient(key.NodePrivate{}, reg, nil)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		return err
	}
	go recvUntilError(c) // Ping's pong is delivered by Recv
	return c.Ping(ctx)
}

// expectClose reads until the server closes (EOF or reset) or 10 s pass.
func expectClose(c net.Conn) error {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return fmt.Errorf("server did not close within 10 s")
	}
	return nil
}

func floodBadInfo(addr string) error {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		return fmt.Errorf("TLS: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"); err != nil {
		return err
	}
	br := bufio.NewReader(c)
	var hdr [5]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return fmt.Errorf("no ServerKey frame: %v", err)
	}
	if hdr[0] != 0x01 || binary.BigEndian.Uint32(hdr[1:]) != 40 {
		return fmt.Errorf("unexpected first frame % x", hdr)
	}
	if _, err := io.ReadFull(br, make([]byte, 40)); err != nil {
		return err
	}
	body := make([]byte, 32+24+40)
	rand.Read(body)
	frame := append([]byte{0x02, 0, 0, 0, 0}, body...)
	binary.BigEndian.PutUint32(frame[1:], uint32(len(body)))
	if _, err := c.Write(frame); err != nil {
		return nil // already closed: fine
	}
	// Nothing but the close may follow (no ServerInfo).
	got, err := io.ReadAll(io.LimitReader(br, 1<<16))
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return fmt.Errorf("server did not close after a bad ClientInfo")
	}
	if len(got) > 0 {
		return fmt.Errorf("server answered %d bytes to a bad ClientInfo", len(got))
	}
	return nil
}

func floodGarbage(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return fmt.Errorf("dial: %v", err)
	}
	defer c.Close()
	b := make([]byte, 517)
	rand.Read(b)
	b[0] = 'Z' // never a TLS record type
	c.Write(b)
	return expectClose(c)
}

func floodCut(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return fmt.Errorf("dial: %v", err)
	}
	c.Write([]byte{0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00})
	c.(*net.TCPConn).SetLinger(0) // reset, not FIN
	return c.Close()
}
