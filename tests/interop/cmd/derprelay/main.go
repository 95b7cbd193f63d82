// Command derprelay drives a DERP server with two of Tailscale's own derphttp
// clients (fresh node keys each) and checks relaying, pings and PeerGone.
//
// Client A talks to the first target, client B to the second one (the same
// server unless -b-map/-b-url is given, e.g. two meshed servers). Packets of
// every size class go A→B and B→A at the same time, each carrying content
// derived from its direction and sequence number, so loss, corruption and
// reordering are detected. At most -window packets are in flight per
// direction (derpprobe uses 30), so the server's 32-deep per-client queue
// never has to drop.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"derp-fleet/tests/interop/internal/check"
	"derp-fleet/tests/interop/internal/target"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

var sizeClasses = []int{0, 1, 100, 1280, 1500, 4096, 16384, 65535, 65536}

const warmupPrefix = "derprelay-warmup"

func main() {
	var ta, tb target.Target
	fs := flag.CommandLine
	ta.AddFlags(fs, "", "client A (and B unless -b-* is given)")
	tb.AddFlags(fs, "b-", "client B (second server, e.g. a mesh peer)")
	perClass := fs.Int("per-class", 250, "packets of each fixed size class per direction")
	random := fs.Int("random", 500, "packets of random size (0..65536) per direction")
	small := fs.Int("small", 10000, "small (0..128 byte) packets per direction in the small-packet run")
	window := fs.Int("window", 30, "max packets in flight per direction")
	pings := fs.Int("pings", 10, "Client.Ping round trips per client")
	seed := fs.Uint64("seed", 1, "seed for the size plan")
	warmLimit := fs.Duration("warmup", 10*time.Second, "how long the first packet each way may take (a new mesh needs a few seconds to learn keys)")
	stall := fs.Duration("stall", 10*time.Second, "fail a run if no packet arrives for this long")
	timeout := fs.Duration("timeout", 120*time.Second, "overall time limit")
	verbose := fs.Bool("v", false, "log Tailscale client messages")
	run := fs.String("run", "", "only run checks whose name matches this regexp")
	fs.Parse(os.Args[1:])

	if err := ta.Resolve(); err != nil {
		fatalf("target A: %v", err)
	}
	if !tb.Set() {
		tb = ta
	} else if err := tb.Resolve(); err != nil {
		fatalf("target B: %v", err)
	}
	if *window < 1 || *window > 10000 {
		fatalf("-window must be 1..10000")
	}
	if *window > 31 {
		fmt.Printf("derprelay: warning: -window %d exceeds the server's 32-deep queue; drops are legitimate (negative control)\n", *window)
	}
	time.AfterFunc(*timeout, func() {
		fmt.Printf("FAIL derprelay: overall timeout %v exceeded\n0 passed, 1 failed\n", *timeout)
		os.Exit(1)
	})

	fmt.Printf("derprelay: A -> %s, B -> %s\n", ta.String(), tb.String())
	r := check.New("derprelay/", *run)
	ctx := context.Background()

	var a, b *peer
	if !r.Run("connect", func() (string, error) {
		var err error
		if a, err = newPeer(ctx, "A", &ta, *verbose); err != nil {
			return "", err
		}
		if b, err = newPeer(ctx, "B", &tb, *verbose); err != nil {
			return "", err
		}
		return a.describe() + "; " + b.describe(), nil
	}) {
		r.Finish()
	}
	a.start()
	b.start()

	for _, p := range []*peer{a, b} {
		r.Run("ping-"+p.name, func() (string, error) { return p.pingRTTs(ctx, *pings) })
	}

	if !r.Run("first-packet", func() (string, error) {
		d1, err := warmup(a, b, *warmLimit)
		if err != nil {
			return "", err
		}
		d2, err := warmup(b, a, *warmLimit)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("A->B delivered after %v, B->A after %v", d1.Round(time.Millisecond), d2.Round(time.Millisecond)), nil
	}) {
		r.Finish()
	}

	r.Run("relay-all-sizes", func() (string, error) {
		mk := func(dirSeed uint64) []int {
			rng := rand.New(rand.NewPCG(*seed, dirSeed))
			var plan []int
			for _, n := range sizeClasses {
				for range *perClass {
					plan = append(plan, n)
				}
			}
			for range *random {
				plan = append(plan, rng.IntN(derp.MaxPacketSize+1))
			}
			rng.Shuffle(len(plan), func(i, j int) { plan[i], plan[j] = plan[j], plan[i] })
			return plan
		}
		return relayBoth(a, b, mk(1), mk(2), *window, *stall, "")
	})
	r.Run("relay-small", func() (string, error) {
		mk := func(dirSeed uint64) []int {
			rng := rand.New(rand.NewPCG(*seed, dirSeed+10))
			plan := make([]int, *small)
			for i := range plan {
				plan[i] = rng.IntN(129)
			}
			return plan
		}
		return relayBoth(a, b, mk(1), mk(2), *window, *stall, "0..128 bytes")
	})

	r.Run("peergone-nothere", func() (string, error) {
		unknown := key.NewNode().Public()
		pkt := discoLike(100)
		a.drainGone()
		t0 := time.Now()
		if err := a.c.Send(unknown, pkt); err != nil {
			return "", err
		}
		m, err := a.waitGone(unknown, 5*time.Second)
		if err != nil {
			return "", fmt.Errorf("disco packet to unknown key %s: %v", unknown.ShortString(), err)
		}
		if m.Reason != derp.PeerGoneReasonNotHere {
			return "", fmt.Errorf("PeerGone reason = %d, want %d (NotHere)", m.Reason, derp.PeerGoneReasonNotHere)
		}
		return fmt.Sprintf("PeerGone(%s, NotHere) after %v", unknown.ShortString(), time.Since(t0).Round(time.Millisecond)), nil
	})

	r.Run("peergone-disconnected", func() (string, error) {
		b.drainGone()
		t0 := time.Now()
		a.close()
		m, err := b.waitGone(a.pub, 10*time.Second)
		if err != nil {
			return "", fmt.Errorf("after A closed: %v", err)
		}
		if m.Reason != derp.PeerGoneReasonDisconnected {
			return "", fmt.Errorf("PeerGone reason = %d, want 0 (Disconnected)", m.Reason)
		}
		took := time.Since(t0)
		// Exactly one: nothing more for A within a short grace period.
		if m2, err := b.waitGone(a.pub, 500*time.Millisecond); err == nil {
			return "", fmt.Errorf("second PeerGone for A (reason %d)", m2.Reason)
		}
		return fmt.Sprintf("B got exactly one PeerGone(A, Disconnected), %v after A closed", took.Round(time.Millisecond)), nil
	})

	r.Run("no-stray-frames", func() (string, error) {
		var msgs []string
		for _, p := range []*peer{a, b} {
			if s := p.strays(); s != "" {
				msgs = append(msgs, p.name+": "+s)
			}
		}
		if len(msgs) > 0 {
			return "", errors.New(strings.Join(msgs, "; "))
		}
		return fmt.Sprintf("A saw %s; B saw %s", a.seen(), b.seen()), nil
	})
	b.close()
	r.Finish()
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "derprelay: "+format+"\n", args...)
	fmt.Println("0 passed, 1 failed")
	os.Exit(1)
}

// discoLike returns an n-byte packet that the server classifies as disco
// (magic "TS💬" prefix, at least 62 bytes).
func discoLike(n int) []byte {
	b := make([]byte, n)
	copy(b, "TS\xf0\x9f\x92\xac")
	for i := 6; i < n; i++ {
		b[i] = byte(i)
	}
	return b
}

// fill writes the deterministic content of packet seq of direction dir.
func fill(b []byte, dir, seq uint64) {
	x := dir<<40 ^ seq*0x9E3779B97F4A7C15 ^ 0xD1B54A32D192ED03
	for i := range b {
		if i%8 == 0 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
		}
		b[i] = byte(x >> (8 * (i % 8)))
	}
}

type peer struct {
	name string
	c    *derphttp.Client
	pub  key.NodePublic

	mu      sync.Mutex
	inbound map[key.NodePublic]*stream // active stream per source
	warm    map[key.NodePublic]chan struct{}
	counts  map[string]int
	stray   []string
	gone    chan derp.PeerGoneMessage
	closed  atomic.Bool
	recvErr atomic.Value
}

func newPeer(ctx context.Context, name string, t *target.Target, verbose bool) (*peer, error) {
	c, err := t.NewClient(key.NodePrivate{}, target.Logf(verbose, "client "+name))
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := c.Connect(cctx); err != nil {
		return nil, fmt.Errorf("client %s: %v", name, err)
	}
	return &peer{
		name:    name,
		c:       c,
		pub:     c.SelfPublicKey(),
		inbound: map[key.NodePublic]*stream{},
		warm:    map[key.NodePublic]chan struct{}{},
		counts:  map[string]int{},
		gone:    make(chan derp.PeerGoneMessage, 64),
	}, nil
}

func (p *peer) describe() string {
	s := fmt.Sprintf("%s %s connected, server key %s", p.name, p.pub.ShortString(), p.c.ServerPublicKey().ShortString())
	if cs, ok := p.c.TLSConnectionState(); ok {
		s += ", " + tls.VersionName(cs.Version)
		if cs.ServerName != "" {
			s += " SNI " + cs.ServerName
		}
	}
	if la, err := p.c.LocalAddr(); err == nil {
		s += ", local " + la.String()
	}
	return s
}

func (p *peer) start() { go p.recvLoop() }

func (p *peer) close() {
	p.closed.Store(true)
	p.c.Close()
}

func (p *peer) recvLoop() {
	for {
		m, err := p.c.Recv()
		if err != nil {
			if !p.closed.Load() {
				p.recvErr.Store(err.Error())
				p.mu.Lock()
				for _, s := range p.inbound {
					s.fail(fmt.Errorf("receiver %s: %v", p.name, err))
				}
				p.mu.Unlock()
			}
			return
		}
		p.mu.Lock()
		p.counts[fmt.Sprintf("%T", m)]++
		switch m := m.(type) {
		case derp.ReceivedPacket:
			if bytes.HasPrefix(m.Data, []byte(warmupPrefix)) {
				if ch := p.warm[m.Source]; ch != nil {
					close(ch)
					delete(p.warm, m.Source)
				}
			} else if s := p.inbound[m.Source]; s != nil {
				s.deliver(m.Data)
			} else {
				p.stray = append(p.stray, fmt.Sprintf("%d-byte packet from %s with no stream", len(m.Data), m.Source.ShortString()))
			}
		case derp.PeerGoneMessage:
			select {
			case p.gone <- m:
			default:
			}
		case derp.HealthMessage:
			p.stray = append(p.stray, fmt.Sprintf("Health frame %q", m.Problem))
		}
		p.mu.Unlock()
	}
}

func (p *peer) strays() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := strings.Join(p.stray, ", ")
	if e, _ := p.recvErr.Load().(string); e != "" {
		s += " recv error: " + e
	}
	return s
}

func (p *peer) seen() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var parts []string
	for k, v := range p.counts {
		parts = append(parts, fmt.Sprintf("%s=%d", strings.TrimPrefix(k, "derp."), v))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

func (p *peer) drainGone() {
	for {
		select {
		case <-p.gone:
		default:
			return
		}
	}
}

func (p *peer) waitGone(k key.NodePublic, d time.Duration) (derp.PeerGoneMessage, error) {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case m := <-p.gone:
			if m.Peer == k {
				return m, nil
			}
		case <-t.C:
			return derp.PeerGoneMessage{}, fmt.Errorf("no PeerGone for %s within %v", k.ShortString(), d)
		}
	}
}

func (p *peer) pingRTTs(ctx context.Context, n int) (string, error) {
	var rtts []time.Duration
	for i := 0; i < n; i++ {
		t0 := time.Now()
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := p.c.Ping(pctx)
		cancel()
		if err != nil {
			return "", fmt.Errorf("ping %d of %d: %v", i+1, n, err)
		}
		rtts = append(rtts, time.Since(t0))
	}
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	return fmt.Sprintf("%d pongs, rtt min %v median %v max %v", n, rtts[0].Round(time.Microsecond), rtts[n/2].Round(time.Microsecond), rtts[n-1].Round(time.Microsecond)), nil
}

// warmup sends marker packets from src to dst every 100 ms until one arrives
// (a mesh needs a moment to learn a new key) or limit passes, then returns how
// long it took.
func warmup(src, dst *peer, limit time.Duration) (time.Duration, error) {
	ch := make(chan struct{})
	dst.mu.Lock()
	dst.warm[src.pub] = ch
	dst.mu.Unlock()
	t0 := time.Now()
	deadline := time.After(limit)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		if err := src.c.Send(dst.pub, []byte(warmupPrefix+strconv.Itoa(i))); err != nil {
			return 0, fmt.Errorf("%s send: %v", src.name, err)
		}
		select {
		case <-ch:
			d := time.Since(t0)
			time.Sleep(200 * time.Millisecond) // let stragglers in
			return d, nil
		case <-tick.C:
		case <-deadline:
			return 0, fmt.Errorf("no packet %s->%s within %v (%d sent)", src.name, dst.name, limit, i+1)
		}
	}
}

type stream struct {
	name     string
	dir      uint64
	plan     []int
	slots    chan struct{}
	buf      []byte
	next     int // receiver side, guarded by the receiving peer's mu
	bytes    int64
	progress atomic.Int64 // unix nanos of the last delivery
	done     chan struct{}
	errOnce  sync.Once
	err      error
}

func newStream(name string, dir uint64, plan []int, window int) *stream {
	s := &stream{name: name, dir: dir, plan: plan, slots: make(chan struct{}, window), buf: make([]byte, derp.MaxPacketSize), done: make(chan struct{})}
	s.progress.Store(time.Now().UnixNano())
	return s
}

func (s *stream) fail(err error) {
	s.errOnce.Do(func() {
		s.err = err
		close(s.done)
	})
}

// deliver is called by the receiving peer's loop with its mu held.
func (s *stream) deliver(data []byte) {
	select {
	case <-s.done:
		return
	default:
	}
	i := s.next
	if i >= len(s.plan) {
		s.fail(fmt.Errorf("%s: extra %d-byte packet after all %d arrived", s.name, len(data), len(s.plan)))
		return
	}
	want := s.buf[:s.plan[i]]
	fill(want, s.dir, uint64(i))
	if !bytes.Equal(data, want) {
		s.fail(fmt.Errorf("%s: packet #%d: got %d bytes, want %d bytes%s", s.name, i, len(data), len(want), s.explain(data, i)))
		return
	}
	s.next++
	s.bytes += int64(len(data))
	s.progress.Store(time.Now().UnixNano())
	<-s.slots
	if s.next == len(s.plan) {
		s.errOnce.Do(func() { close(s.done) })
	}
}

// explain says which packet the wrong one really was (lost or reordered).
func (s *stream) explain(data []byte, i int) string {
	for j := range s.plan {
		if j == i || s.plan[j] != len(data) {
			continue
		}
		b := make([]byte, s.plan[j])
		fill(b, s.dir, uint64(j))
		if bytes.Equal(b, data) {
			if j > i {
				return fmt.Sprintf(" (it is packet #%d: %d packets lost, or reordered)", j, j-i)
			}
			return fmt.Sprintf(" (it is packet #%d again or late: duplicated or reordered)", j)
		}
	}
	if len(data) == len(s.buf[:s.plan[i]]) {
		return " (same length, content corrupted)"
	}
	return ""
}

func (s *stream) send(from *peer, to key.NodePublic) {
	buf := make([]byte, derp.MaxPacketSize)
	for i, n := range s.plan {
		select {
		case s.slots <- struct{}{}:
		case <-s.done:
			return
		}
		fill(buf[:n], s.dir, uint64(i))
		if err := from.c.Send(to, buf[:n]); err != nil {
			s.fail(fmt.Errorf("%s: send #%d (%d bytes): %v", s.name, i, n, err))
			return
		}
	}
}

func relayBoth(a, b *peer, planAB, planBA []int, window int, stall time.Duration, sizes string) (string, error) {
	ab := newStream("A->B", 1, planAB, window)
	ba := newStream("B->A", 2, planBA, window)
	b.mu.Lock()
	b.inbound[a.pub] = ab
	b.mu.Unlock()
	a.mu.Lock()
	a.inbound[b.pub] = ba
	a.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.inbound, a.pub)
		b.mu.Unlock()
		a.mu.Lock()
		delete(a.inbound, b.pub)
		a.mu.Unlock()
	}()
	t0 := time.Now()
	go ab.send(a, b.pub)
	go ba.send(b, a.pub)
	var lines []string
	for _, s := range []*stream{ab, ba} {
		if err := waitStream(s, stall); err != nil {
			return "", err
		}
		d := time.Since(t0)
		lines = append(lines, fmt.Sprintf("%s %d packets %.1f MB in %v (%.0f pkt/s, %.1f MB/s)",
			s.name, len(s.plan), float64(s.bytes)/1e6, d.Round(time.Millisecond),
			float64(len(s.plan))/d.Seconds(), float64(s.bytes)/1e6/d.Seconds()))
	}
	if sizes == "" {
		sizes = sizeSummary(planAB)
	}
	return strings.Join(lines, "; ") + "; sizes " + sizes, nil
}

func waitStream(s *stream, stall time.Duration) error {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-s.done:
			return s.err
		case <-tick.C:
			last := time.Unix(0, s.progress.Load())
			if time.Since(last) > stall {
				s.fail(fmt.Errorf("%s: stalled: no packet for %v after #%d of %d (%d in flight)", s.name, stall, s.next, len(s.plan), len(s.slots)))
			}
		}
	}
}

func sizeSummary(plan []int) string {
	count := map[int]int{}
	other := 0
	for _, n := range plan {
		if contains(sizeClasses, n) {
			count[n]++
		} else {
			other++
		}
	}
	var parts []string
	for _, n := range sizeClasses {
		if count[n] > 0 {
			parts = append(parts, fmt.Sprintf("%d×%dB", count[n], n))
		}
	}
	if other > 0 {
		parts = append(parts, fmt.Sprintf("%d×random", other))
	}
	return strings.Join(parts, " ")
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
