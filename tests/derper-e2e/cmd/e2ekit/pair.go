package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// cmdPair: clients A (on -a-map) and B (on -b-map) relay a continuous stream
// both ways until -stop-file exists or -max passes. Each packet carries its
// sequence number and content derived from it; at most -window are in flight
// per direction, so no queue ever has to drop: every packet must arrive, in
// order, intact.
func cmdPair(args []string) {
	fs := flag.NewFlagSet("pair", flag.ExitOnError)
	name := fs.String("name", "pair", "check name prefix")
	aMap := fs.String("a-map", "", "DERP map for client A")
	bMap := fs.String("b-map", "", "DERP map for client B (default: -a-map)")
	size := fs.Int("size", 1200, "packet size")
	bigEvery := fs.Int("big-every", 8, "every Nth packet is 16 KiB (0: never)")
	window := fs.Int("window", 30, "packets in flight per direction")
	minDur := fs.Duration("min", 2*time.Second, "run at least this long")
	maxDur := fs.Duration("max", 120*time.Second, "run at most this long")
	readyFile := fs.String("ready-file", "", "created once both directions flow")
	stopFile := fs.String("stop-file", "", "stop when this file exists")
	stall := fs.Duration("stall", 10*time.Second, "fail if a direction makes no progress this long")
	fs.Parse(args)
	if *bMap == "" {
		*bMap = *aMap
	}
	ra, rb := loadRegion(*aMap, 0), loadRegion(*bMap, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	a, b := regionClient(key.NodePrivate{}, ra, nil), regionClient(key.NodePrivate{}, rb, nil)
	fatalIf(a.Connect(ctx), "A connect")
	fatalIf(b.Connect(ctx), "B connect")
	ab := newSeqStream("A->B", *size, *bigEvery, *window)
	ba := newSeqStream("B->A", *size, *bigEvery, *window)
	go ab.recvLoop(b, a.SelfPublicKey())
	go ba.recvLoop(a, b.SelfPublicKey())

	// Warm up: a mesh needs a moment to learn a new key.
	t0 := time.Now()
	for _, w := range []struct {
		s        *seqStream
		from     *derphttp.Client
		to       key.NodePublic
	}{{ab, a, b.SelfPublicKey()}, {ba, b, a.SelfPublicKey()}} {
		if err := w.s.warmup(w.from, w.to, 30*time.Second); err != nil {
			fail(*name+"/warmup", "%v", err)
			return
		}
	}
	warm := time.Since(t0)
	start := time.Now()
	go ab.send(a, b.SelfPublicKey())
	go ba.send(b, a.SelfPublicKey())
	if *readyFile != "" {
		os.WriteFile(*readyFile, []byte("ready\n"), 0o644)
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		<-tick.C
		el := time.Since(start)
		stop := el >= *maxDur
		if el >= *minDur && *stopFile != "" {
			if _, err := os.Stat(*stopFile); err == nil {
				stop = true
			}
		} else if el >= *minDur && *stopFile == "" {
			stop = true
		}
		for _, s := range []*seqStream{ab, ba} {
			if s.failed() == nil && time.Since(time.Unix(0, s.progress.Load())) > *stall {
				s.setErr(fmt.Errorf("%s: no progress for %v after %d packets", s.name, *stall, s.recvd.Load()))
			}
		}
		if stop || ab.failed() != nil || ba.failed() != nil {
			break
		}
	}
	ab.stop()
	ba.stop()
	// Drain what is in flight.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && (ab.inFlight() > 0 || ba.inFlight() > 0) && ab.failed() == nil && ba.failed() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	el := time.Since(start)
	for _, s := range []*seqStream{ab, ba} {
		if err := s.failed(); err != nil {
			fail(*name+"/"+s.name, "%v", err)
			continue
		}
		sent, got := s.sent.Load(), s.recvd.Load()
		check(*name+"/"+s.name, sent == got && sent > 0,
			"%d of %d packets arrived in order and intact over %v (%.0f pkt/s, %.1f MB/s), longest wait between deliveries %s, warm-up %s",
			got, sent, el.Round(time.Millisecond), float64(got)/el.Seconds(), float64(s.bytes.Load())/1e6/el.Seconds(),
			ms(time.Duration(s.maxGap.Load())), ms(warm))
	}
	a.Close()
	b.Close()
}

func fatalIf(err error, what string) {
	if err != nil {
		fatalf("%s: %v", what, err)
	}
}

type seqStream struct {
	name            string
	size, bigEvery  int
	slots           chan struct{}
	done            chan struct{}
	stopOnce        sync.Once
	errMu           sync.Mutex
	err             error
	sent, recvd     atomic.Int64
	bytes           atomic.Int64
	progress        atomic.Int64
	maxGap          atomic.Int64
	warm            chan struct{}
	warmOnce        sync.Once
}

func newSeqStream(name string, size, bigEvery, window int) *seqStream {
	s := &seqStream{name: name, size: size, bigEvery: bigEvery, slots: make(chan struct{}, window), done: make(chan struct{}), warm: make(chan struct{})}
	s.progress.Store(time.Now().UnixNano())
	return s
}

func (s *seqStream) setErr(err error) {
	s.errMu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.errMu.Unlock()
	s.stop()
}

func (s *seqStream) failed() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

func (s *seqStream) stop()        { s.stopOnce.Do(func() { close(s.done) }) }
func (s *seqStream) inFlight() int { return len(s.slots) }

func (s *seqStream) sizeOf(seq int64) int {
	if s.bigEvery > 0 && seq%int64(s.bigEvery) == int64(s.bigEvery-1) {
		return 16384
	}
	return s.size
}

func (s *seqStream) packet(buf []byte, seq int64) []byte {
	p := buf[:s.sizeOf(seq)]
	binary.BigEndian.PutUint64(p, uint64(seq))
	for i := 8; i < len(p); i++ {
		p[i] = byte(seq*31 + int64(i))
	}
	return p
}

func (s *seqStream) warmup(from *derphttp.Client, to key.NodePublic, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for i := 0; time.Now().Before(deadline); i++ {
		if err := from.Send(to, []byte("warmup")); err != nil {
			return fmt.Errorf("%s warm-up send: %v", s.name, err)
		}
		select {
		case <-s.warm:
			time.Sleep(200 * time.Millisecond)
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s: no warm-up packet arrived within %v", s.name, limit)
}

func (s *seqStream) send(c *derphttp.Client, to key.NodePublic) {
	buf := make([]byte, 16384)
	for seq := int64(0); ; seq++ {
		select {
		case s.slots <- struct{}{}:
		case <-s.done:
			return
		}
		select {
		case <-s.done:
			<-s.slots
			return
		default:
		}
		s.sent.Add(1)
		if err := c.Send(to, s.packet(buf, seq)); err != nil {
			s.setErr(fmt.Errorf("%s: send #%d: %v", s.name, seq, err))
			return
		}
	}
}

func (s *seqStream) recvLoop(c *derphttp.Client, from key.NodePublic) {
	buf := make([]byte, 16384)
	last := time.Now()
	for {
		m, err := c.Recv()
		if err != nil {
			select {
			case <-s.done:
			default:
				s.setErr(fmt.Errorf("%s receiver: %v", s.name, err))
			}
			return
		}
		rp, ok := m.(derp.ReceivedPacket)
		if !ok || rp.Source != from {
			continue
		}
		if string(rp.Data) == "warmup" {
			s.warmOnce.Do(func() { close(s.warm) })
			continue
		}
		want := s.recvd.Load()
		if !bytes.Equal(rp.Data, s.packet(buf, want)) {
			got := int64(-1)
			if len(rp.Data) >= 8 {
				got = int64(binary.BigEndian.Uint64(rp.Data))
			}
			s.setErr(fmt.Errorf("%s: packet #%d: got %d bytes carrying #%d (lost, reordered or corrupted)", s.name, want, len(rp.Data), got))
			return
		}
		now := time.Now()
		if want > 0 {
			if g := now.Sub(last); int64(g) > s.maxGap.Load() {
				s.maxGap.Store(int64(g))
			}
		}
		last = now
		s.recvd.Add(1)
		s.bytes.Add(int64(len(rp.Data)))
		s.progress.Store(now.UnixNano())
		<-s.slots
	}
}
