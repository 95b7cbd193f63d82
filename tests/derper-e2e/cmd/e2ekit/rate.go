package main

import (
	"context"
	"flag"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// cmdRate: client A sends to B at -offered bytes/s (payload) for -dur; B counts
// what arrives in that time. The server's per-client receive limit
// (-rate-config) shows as the rate B sees: about the offered rate below the
// limit, about the limit above it (the burst passes first). The check passes
// when the rate B saw is within [-min, -max] bytes/s.
func cmdRate(args []string) {
	fs := flag.NewFlagSet("rate", flag.ExitOnError)
	name := fs.String("name", "rate", "check name")
	mapFile := fs.String("map", "", "DERP map")
	offered := fs.Int("offered", 100000, "payload bytes per second A sends")
	size := fs.Int("size", 1000, "packet payload size")
	dur := fs.Duration("dur", 4*time.Second, "measurement time")
	lo := fs.Int("min", 0, "least acceptable bytes/s at B")
	hi := fs.Int("max", 1<<40, "most acceptable bytes/s at B")
	fs.Parse(args)
	reg := loadRegion(*mapFile, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	a, b := regionClient(key.NodePrivate{}, reg, nil), regionClient(key.NodePrivate{}, reg, nil)
	fatalIf(a.Connect(ctx), "A connect")
	fatalIf(b.Connect(ctx), "B connect")
	defer a.Close()
	defer b.Close()
	// Warm up: B must be known to the server before the clock starts.
	var got atomic.Int64
	first := make(chan struct{})
	go func() {
		once := false
		for {
			m, err := b.Recv()
			if err != nil {
				return
			}
			if p, ok := m.(derp.ReceivedPacket); ok {
				if !once {
					once = true
					close(first)
					continue
				}
				got.Add(int64(len(p.Data)))
			}
		}
	}()
	probe := make([]byte, 8)
	for deadline := time.Now().Add(10 * time.Second); ; {
		a.Send(b.SelfPublicKey(), probe)
		select {
		case <-first:
		case <-time.After(100 * time.Millisecond):
			if time.Now().Before(deadline) {
				continue
			}
			fatalf("warm-up: nothing reached B")
		}
		break
	}
	pkt := make([]byte, *size)
	stop := make(chan struct{})
	var sent atomic.Int64
	go func() {
		const step = 10 * time.Millisecond
		per := float64(*offered) * step.Seconds()
		credit := 0.0
		t := time.NewTicker(step)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			credit += per
			for credit >= float64(*size) {
				if err := a.Send(b.SelfPublicKey(), pkt); err != nil {
					return
				}
				sent.Add(int64(*size))
				credit -= float64(*size)
			}
		}
	}()
	start := time.Now()
	time.Sleep(*dur)
	rate := float64(got.Load()) / time.Since(start).Seconds()
	close(stop)
	check(*name, rate >= float64(*lo) && rate <= float64(*hi),
		"offered %d B/s for %v: B received %.0f B/s (A got %.0f B/s out; accepted range %d..%d)",
		*offered, *dur, rate, float64(sent.Load())/dur.Seconds(), *lo, *hi)
}
