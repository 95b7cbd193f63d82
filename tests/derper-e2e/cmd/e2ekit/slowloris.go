package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"net"
	"sort"
	"sync"
	"time"
)

// cmdSlowloris opens -n connections at once. Half send a TLS record header
// and then one byte per -interval (stuck in the TLS handshake); the other half
// complete TLS and then send the HTTP request head one byte per -interval.
// The server must close every one of them (handshake / request-head
// deadline); the time it took is reported.
func cmdSlowloris(args []string) {
	fs := flag.NewFlagSet("slowloris", flag.ExitOnError)
	name := fs.String("name", "slowloris", "check name")
	addr := fs.String("addr", "", "host:port")
	n := fs.Int("n", 200, "connections")
	interval := fs.Duration("interval", 500*time.Millisecond, "one byte per interval")
	limit := fs.Duration("limit", 40*time.Second, "give up (fail) after this long")
	fs.Parse(args)
	head := "GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
	for len(head) < 4000 {
		head += "X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
	}
	type res struct {
		kind   int
		closed time.Duration // 0: never closed
		err    string
	}
	results := make([]res, *n)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := 0; i < *n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			kind := i % 2
			results[i].kind = kind
			var c net.Conn
			var err error
			start := time.Now()
			var bytes []byte
			if kind == 0 {
				c, err = net.DialTimeout("tcp", *addr, 5*time.Second)
				bytes = append([]byte{0x16, 0x03, 0x01, 0x40, 0x00}, make([]byte, 1000)...)
			} else {
				c, err = tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", *addr, &tls.Config{InsecureSkipVerify: true})
				bytes = []byte(head)
			}
			if err != nil {
				results[i].err = err.Error()
				return
			}
			start = time.Now()
			defer c.Close()
			closed := make(chan struct{})
			go func() {
				buf := make([]byte, 512)
				c.SetReadDeadline(time.Now().Add(*limit))
				for {
					if _, err := c.Read(buf); err != nil {
						close(closed)
						return
					}
				}
			}()
			for j := 0; ; j++ {
				if j < len(bytes) {
					if _, err := c.Write(bytes[j : j+1]); err != nil {
						<-closed
						results[i].closed = time.Since(start)
						return
					}
				}
				select {
				case <-closed:
					if time.Since(start) < *limit {
						results[i].closed = time.Since(start)
					}
					return
				case <-time.After(*interval):
				}
				if time.Since(start) > *limit {
					return
				}
			}
		}(i)
	}
	wg.Wait()
	var closedT [2][]time.Duration
	var open, dialErr int
	firstErr := ""
	for _, r := range results {
		switch {
		case r.err != "":
			dialErr++
			if firstErr == "" {
				firstErr = r.err
			}
		case r.closed == 0:
			open++
		default:
			closedT[r.kind] = append(closedT[r.kind], r.closed)
		}
	}
	stat := func(ds []time.Duration) string {
		if len(ds) == 0 {
			return "none"
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		return fmt.Sprintf("%d closed after min %.1f s median %.1f s max %.1f s", len(ds), ds[0].Seconds(), ds[len(ds)/2].Seconds(), ds[len(ds)-1].Seconds())
	}
	extra := ""
	if firstErr != "" {
		extra = "; first dial error: " + firstErr
	}
	check(*name, open == 0 && dialErr == 0,
		"%d slow connections (1 byte per %v) over %v: stuck in TLS: %s; slow request head: %s; never closed %d, not connected %d%s",
		*n, *interval, time.Since(t0).Round(time.Millisecond), stat(closedT[0]), stat(closedT[1]), open, dialErr, extra)
}
