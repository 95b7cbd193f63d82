package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// cmdFailover: -n clients use NewRegionClient on the two-node region map
// (-map: node 1 first, as tailscaled dials) and so attach to node 1; each has
// a partner on node 2 (-peer-map). Both sides send to each other every
// -interval. Then node 1 (-pid) gets SIGTERM. Each client must see the
// Restarting frame, then the close, then reconnect (to node 2) and relay again.
// The gap is the longest time without a delivery, per direction, around the
// restart. The process must exit within -exit-deadline.
func cmdFailover(args []string) {
	fs := flag.NewFlagSet("failover", flag.ExitOnError)
	mapFile := fs.String("map", "", "two-node region map (node 1 first)")
	peerMap := fs.String("peer-map", "", "node 2 only")
	n := fs.Int("n", 4, "clients on node 1")
	pid := fs.Int("pid", 0, "node 1's process id (gets SIGTERM)")
	k1 := fs.String("node1-key", "", "node 1's -c key file")
	k2 := fs.String("node2-key", "", "node 2's -c key file")
	interval := fs.Duration("interval", 10*time.Millisecond, "send interval per client")
	exitDeadline := fs.Duration("exit-deadline", 6*time.Second, "node 1 must have exited by then")
	settle := fs.Duration("settle", 2*time.Second, "relay this long after every client is back")
	fs.Parse(args)
	reg, preg := loadRegion(*mapFile, 0), loadRegion(*peerMap, 0)
	n1, n2 := readServerKey(*k1), readServerKey(*k2)

	type side struct {
		c       *derphttp.Client
		mu      sync.Mutex
		arrivals []time.Time
		restart []time.Time
		closed  []time.Time
		closeErr string
		servers []key.NodePublic
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	clients := make([]*side, *n)
	partners := make([]*side, *n)
	for i := range clients {
		clients[i] = &side{c: regionClient(key.NodePrivate{}, reg, nil)}
		partners[i] = &side{c: regionClient(key.NodePrivate{}, preg, nil)}
		fatalIf(clients[i].c.Connect(ctx), fmt.Sprintf("client %d connect", i))
		fatalIf(partners[i].c.Connect(ctx), fmt.Sprintf("partner %d connect", i))
	}
	var onNode1 int
	for i := range clients {
		if clients[i].c.ServerPublicKey() == n1 {
			onNode1++
		}
		if partners[i].c.ServerPublicKey() != n2 {
			fatalf("partner %d is not on node 2", i)
		}
	}
	if !check("lifecycle/clients-on-node1", onNode1 == *n, "%d of %d NewRegionClient clients attached to node 1 (first in the map)", onNode1, *n) {
		return
	}
	stop := make(chan struct{})
	recv := func(s *side, from key.NodePublic) {
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
				s.closed = append(s.closed, now)
				if s.closeErr == "" {
					s.closeErr = err.Error()
				}
				s.mu.Unlock()
				time.Sleep(5 * time.Millisecond) // the next Recv redials
				continue
			}
			s.mu.Lock()
			switch m := m.(type) {
			case derp.ReceivedPacket:
				if m.Source == from && len(m.Data) == 8 {
					s.arrivals = append(s.arrivals, now)
				}
			case derp.ServerRestartingMessage:
				s.restart = append(s.restart, now)
			case derp.ServerInfoMessage:
				s.servers = append(s.servers, s.c.ServerPublicKey())
			}
			s.mu.Unlock()
		}
	}
	send := func(s *side, to key.NodePublic) {
		var seq uint64
		t := time.NewTicker(*interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			seq++
			var b [8]byte
			binary.BigEndian.PutUint64(b[:], seq)
			s.c.Send(to, b[:]) // errors while reconnecting are expected: that is the gap
		}
	}
	for i := range clients {
		go recv(clients[i], partners[i].c.SelfPublicKey())
		go recv(partners[i], clients[i].c.SelfPublicKey())
		go send(clients[i], partners[i].c.SelfPublicKey())
		go send(partners[i], clients[i].c.SelfPublicKey())
	}
	count := func(s *side, after time.Time) int {
		s.mu.Lock()
		defer s.mu.Unlock()
		k := 0
		for _, t := range s.arrivals {
			if t.After(after) {
				k++
			}
		}
		return k
	}
	// Both directions flowing (through the mesh) before the restart.
	warm := time.Now()
	for time.Since(warm) < 30*time.Second {
		ok := true
		for i := range clients {
			if count(clients[i], warm) < 5 || count(partners[i], warm) < 5 {
				ok = false
			}
		}
		if ok {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !check("lifecycle/relay-before", time.Since(warm) < 30*time.Second, "every client and partner relaying across the mesh after %s", ms(time.Since(warm))) {
		close(stop)
		return
	}
	time.Sleep(500 * time.Millisecond)

	t0 := time.Now()
	if err := syscall.Kill(*pid, syscall.SIGTERM); err != nil {
		fatalf("SIGTERM %d: %v", *pid, err)
	}
	// Watch node 1's exit (it is the runner's child: a zombie once exited).
	exited := make(chan time.Duration, 1)
	go func() {
		for time.Since(t0) < 30*time.Second {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", *pid))
			if err != nil || strings.Contains(string(b), ") Z ") {
				exited <- time.Since(t0)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		exited <- -1
	}()
	// Every client back: closed after t0, and packets both ways after its close.
	back := func(i int) bool {
		c := clients[i]
		c.mu.Lock()
		var cl time.Time
		for _, t := range c.closed {
			if t.After(t0) {
				cl = t
				break
			}
		}
		c.mu.Unlock()
		return !cl.IsZero() && count(c, cl) >= 3 && count(partners[i], cl) >= 3
	}
	for time.Since(t0) < 30*time.Second {
		all := true
		for i := range clients {
			if !back(i) {
				all = false
			}
		}
		if all {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	allBack := time.Since(t0)
	time.Sleep(*settle)
	ex := <-exited
	close(stop)

	var gaps []time.Duration
	for i := range clients {
		c, p := clients[i], partners[i]
		c.mu.Lock()
		p.mu.Lock()
		var rs, cl time.Time
		for _, t := range c.restart {
			if t.After(t0) {
				rs = t
				break
			}
		}
		for _, t := range c.closed {
			if t.After(t0) {
				cl = t
				break
			}
		}
		gapIn := maxGap(c.arrivals, t0.Add(-time.Second))
		gapOut := maxGap(p.arrivals, t0.Add(-time.Second))
		server := key.NodePublic{}
		if k := len(c.servers); k > 0 {
			server = c.servers[k-1]
		}
		cur := c.c.ServerPublicKey()
		prestart := len(p.restart)
		c.mu.Unlock()
		p.mu.Unlock()
		name := fmt.Sprintf("lifecycle/client-%d", i)
		ok := !rs.IsZero() && !cl.IsZero() && !rs.After(cl) && cur == n2 && back(i) && prestart == 0
		why := ""
		switch {
		case rs.IsZero():
			why = "no Restarting frame; "
		case cl.IsZero():
			why = "connection never closed; "
		case rs.After(cl):
			why = "Restarting after the close; "
		case cur != n2:
			why = "not on node 2 afterwards; "
		case prestart != 0:
			why = "a node-2 partner saw Restarting; "
		}
		_ = server
		g := gapIn
		if gapOut > g {
			g = gapOut
		}
		gaps = append(gaps, g)
		d := func(t time.Time) string {
			if t.IsZero() {
				return "never"
			}
			return "+" + ms(t.Sub(t0))
		}
		check(name, ok, "%sRestarting %s, close %s, back on node 2 relaying both ways; gap without relay %s (partner->client %s, client->partner %s)",
			why, d(rs), d(cl), ms(g), ms(gapIn), ms(gapOut))
	}
	sort.Slice(gaps, func(i, j int) bool { return gaps[i] < gaps[j] })
	if len(gaps) > 0 {
		fmt.Printf("lifecycle: gaps min %s median %s max %s; all clients back %s after SIGTERM\n", ms(gaps[0]), ms(gaps[len(gaps)/2]), ms(gaps[len(gaps)-1]), ms(allBack))
	}
	check("lifecycle/exit-within-deadline", ex >= 0 && ex <= *exitDeadline, "node 1 exited %s after SIGTERM (deadline %v; exit status checked by the runner)", ms(ex), *exitDeadline)
	for i := range clients {
		clients[i].c.Close()
		partners[i].c.Close()
	}
}

// maxGap is the longest interval between consecutive arrivals after since.
func maxGap(ts []time.Time, since time.Time) time.Duration {
	var g time.Duration
	var prev time.Time
	for _, t := range ts {
		if t.Before(since) {
			continue
		}
		if !prev.IsZero() && t.Sub(prev) > g {
			g = t.Sub(prev)
		}
		prev = t
	}
	return g
}
