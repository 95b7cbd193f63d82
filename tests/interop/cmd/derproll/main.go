// Command derproll measures what a rollout of a DERP region does to two
// relaying clients: Tailscale's derphttp region clients A and B (fresh node
// keys) send each other a small sequence-numbered packet every -interval,
// both ways, until -stop-file exists. It reports, per direction, the longest
// time without a delivery (the relay stall), the packets lost, and per client
// the reconnects, Restarting frames and the servers (keys) it was attached to.
//
// The clients behave as tailscaled's magicsock does on a broken DERP
// connection: the next Recv (after a short pause) redials the region, nodes
// in map order, and Send redials too. tailscaled ignores the Restarting frame
// (magicsock's reader drops unknown messages), so neither does this tool.
//
// Output: one "derproll: ..." line per event (reconnects, server changes),
// then "RESULT <dir> ..." lines and a final "STALL max=<ms> move=<ms>
// moves=<n> lost=<n> broken=<0|1>" line: max is the longest gap in deliveries
// over the whole run, move the longest gap around a broken connection (the
// stall a client move causes, without the machine's scheduling noise). Exit 0 unless a client could not connect at start or a
// direction never resumed ("broken").
package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"derp-fleet/tests/interop/internal/target"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

type side struct {
	name string
	c    *derphttp.Client
	t0   time.Time

	mu       sync.Mutex
	arrivals []time.Time // packets from the partner, in arrival order
	seqs     map[uint64]bool
	errors   int
	restarts int
	servers  []string    // distinct server keys, in order
	errTimes []time.Time // when the connection broke (each starts a move)
}

func (s *side) event(format string, args ...any) {
	fmt.Printf("derproll: +%7.3fs %s: %s\n", time.Since(s.t0).Seconds(), s.name, fmt.Sprintf(format, args...))
}

func (s *side) recvLoop(from key.NodePublic, stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		default:
		}
		m, err := s.c.Recv()
		now := time.Now()
		if err != nil {
			s.mu.Lock()
			s.errors++
			s.errTimes = append(s.errTimes, now)
			s.mu.Unlock()
			s.event("recv error (redialing): %v", err)
			// magicsock backs off 5-15 ms after a first error before it redials.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		switch m := m.(type) {
		case derp.ReceivedPacket:
			if m.Source == from && len(m.Data) == 8 {
				seq := binary.BigEndian.Uint64(m.Data)
				s.mu.Lock()
				s.arrivals = append(s.arrivals, now)
				s.seqs[seq] = true
				s.mu.Unlock()
			}
		case derp.ServerRestartingMessage:
			s.mu.Lock()
			s.restarts++
			s.mu.Unlock()
			s.event("Restarting frame (reconnect in %v, try for %v)", m.ReconnectIn, m.TryFor)
		case derp.ServerInfoMessage:
			k := s.c.ServerPublicKey().ShortString()
			s.mu.Lock()
			if len(s.servers) == 0 || s.servers[len(s.servers)-1] != k {
				s.servers = append(s.servers, k)
				s.mu.Unlock()
				s.event("attached to server %s", k)
			} else {
				s.mu.Unlock()
			}
		}
	}
}

func (s *side) sendLoop(to key.NodePublic, interval time.Duration, stop <-chan struct{}, sent *atomic.Uint64) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], sent.Add(1))
		_ = s.c.Send(to, b[:]) // an error while redialing is part of the stall being measured
	}
}

// gapAround is the interval between the last arrival before t and the first after it.
func gapAround(ts []time.Time, t time.Time) time.Duration {
	var before, after time.Time
	for _, a := range ts {
		if !a.After(t) {
			before = a
		} else {
			after = a
			break
		}
	}
	if before.IsZero() || after.IsZero() {
		return 0
	}
	return after.Sub(before)
}

// maxGap is the longest interval between consecutive arrivals, and when it began.
func maxGap(ts []time.Time) (time.Duration, time.Time) {
	var g time.Duration
	var at time.Time
	for i := 1; i < len(ts); i++ {
		if d := ts[i].Sub(ts[i-1]); d > g {
			g, at = d, ts[i-1]
		}
	}
	return g, at
}

func main() {
	var ta, tb target.Target
	fs := flag.CommandLine
	ta.AddFlags(fs, "a-", "client A")
	tb.AddFlags(fs, "b-", "client B")
	interval := fs.Duration("interval", 10*time.Millisecond, "send interval per direction")
	stopFile := fs.String("stop-file", "", "stop once this file exists")
	readyFile := fs.String("ready-file", "", "created once both directions relay")
	maxDur := fs.Duration("max", 5*time.Minute, "stop after this long in any case")
	brokenAfter := fs.Duration("broken", 10*time.Second, "a direction silent this long at the end counts as broken")
	verbose := fs.Bool("v", false, "log Tailscale client messages")
	fs.Parse(os.Args[1:])
	for _, t := range []*target.Target{&ta, &tb} {
		if err := t.Resolve(); err != nil {
			fmt.Printf("derproll: %v\n", err)
			os.Exit(2)
		}
	}
	t0 := time.Now()
	mk := func(name string, t *target.Target) *side {
		c, err := t.NewClient(key.NodePrivate{}, target.Logf(*verbose, name))
		if err != nil {
			fmt.Printf("derproll: client %s: %v\n", name, err)
			os.Exit(2)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := c.Connect(ctx); err != nil {
			fmt.Printf("derproll: client %s cannot connect: %v\n", name, err)
			os.Exit(2)
		}
		return &side{name: name, c: c, t0: t0, seqs: map[uint64]bool{}}
	}
	a, b := mk("A", &ta), mk("B", &tb)
	stop := make(chan struct{})
	var sentAB, sentBA atomic.Uint64
	go a.recvLoop(b.c.SelfPublicKey(), stop)
	go b.recvLoop(a.c.SelfPublicKey(), stop)
	go a.sendLoop(b.c.SelfPublicKey(), *interval, stop, &sentAB)
	go b.sendLoop(a.c.SelfPublicKey(), *interval, stop, &sentBA)

	count := func(s *side) int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.arrivals) }
	// Warm-up: across a mesh a new key takes a moment to be known everywhere.
	for time.Since(t0) < 30*time.Second && (count(a) < 5 || count(b) < 5) {
		time.Sleep(20 * time.Millisecond)
	}
	if count(a) < 5 || count(b) < 5 {
		fmt.Printf("derproll: the clients never relayed (A got %d, B got %d)\nSTALL max=-1 lost=-1 broken=1\n", count(a), count(b))
		os.Exit(1)
	}
	// The measurement starts with both directions flowing.
	for _, s := range []*side{a, b} {
		s.mu.Lock()
		s.arrivals = s.arrivals[len(s.arrivals)-1:]
		s.mu.Unlock()
	}
	fmt.Printf("derproll: relaying both ways after %.2fs\n", time.Since(t0).Seconds())
	if *readyFile != "" {
		os.WriteFile(*readyFile, []byte("ready\n"), 0o644)
	}
	for time.Since(t0) < *maxDur {
		if *stopFile != "" {
			if _, err := os.Stat(*stopFile); err == nil {
				break
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	end := time.Now()
	// A last delivery lets a direction that resumed just now show it did.
	time.Sleep(200 * time.Millisecond)
	close(stop)
	time.Sleep(50 * time.Millisecond)

	// Every broken connection starts a move; its stall is the gap in each direction around it.
	var moves []time.Time
	for _, s := range []*side{a, b} {
		s.mu.Lock()
		moves = append(moves, s.errTimes...)
		s.mu.Unlock()
	}
	var worstMove time.Duration
	for _, s := range []*side{a, b} {
		s.mu.Lock()
		for _, t := range moves {
			if g := gapAround(s.arrivals, t); g > worstMove {
				worstMove = g
			}
		}
		s.mu.Unlock()
	}
	var worst time.Duration
	totalLost := 0
	broken := 0
	for _, d := range []struct {
		dir  string
		to   *side
		from *side
		sent uint64
	}{{"A->B", b, a, sentAB.Load()}, {"B->A", a, b, sentBA.Load()}} {
		d.to.mu.Lock()
		g, at := maxGap(d.to.arrivals)
		last := time.Time{}
		if n := len(d.to.arrivals); n > 0 {
			last = d.to.arrivals[n-1]
		}
		got := len(d.to.seqs)
		d.to.mu.Unlock()
		if g > worst {
			worst = g
		}
		lost := int(d.sent) - got
		if lost < 0 {
			lost = 0
		}
		totalLost += lost
		silent := end.Sub(last)
		isBroken := silent > *brokenAfter
		if isBroken {
			broken = 1
		}
		fmt.Printf("RESULT %s longest-gap=%dms at=+%.3fs sent=%d received=%d lost=%d silent-at-end=%dms broken=%v\n",
			d.dir, g.Milliseconds(), at.Sub(t0).Seconds(), d.sent, got, lost, silent.Milliseconds(), isBroken)
	}
	for _, s := range []*side{a, b} {
		s.mu.Lock()
		fmt.Printf("RESULT client %s recv-errors=%d restarting-frames=%d servers=%v\n", s.name, s.errors, s.restarts, s.servers)
		s.mu.Unlock()
	}
	fmt.Printf("STALL max=%d move=%d moves=%d lost=%d broken=%d\n", worst.Milliseconds(), worstMove.Milliseconds(), len(moves), totalLost, broken)
	a.c.Close()
	b.c.Close()
	if broken != 0 {
		os.Exit(1)
	}
}
