package main

import (
	"bytes"
	"fmt"
	"time"

	"derp-fleet/tests/interop/internal/rawderp"

	"tailscale.com/types/key"
)

// checkPing8: §8.8, §17 item 29.
func checkPing8() (string, error) {
	cs, done, err := clients(1)
	if err != nil {
		return "", err
	}
	defer done()
	c := cs[0]
	data := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	t0 := time.Now()
	if err := c.WriteFrame(rawderp.Ping, data); err != nil {
		return "", err
	}
	t, p, err := c.Next(5 * time.Second)
	if err != nil {
		return "", err
	}
	if t != rawderp.Pong || !bytes.Equal(p, data) {
		return "", fmt.Errorf("got frame 0x%02x % x, want Pong % x", t, p, data)
	}
	return fmt.Sprintf("Pong with the same 8 bytes in %v", time.Since(t0).Round(time.Microsecond)), nil
}

// checkPing12: §17 item 30.
func checkPing12() (string, error) {
	cs, done, err := clients(1)
	if err != nil {
		return "", err
	}
	defer done()
	c := cs[0]
	data := []byte("0123456789AB")
	if err := c.WriteFrame(rawderp.Ping, data); err != nil {
		return "", err
	}
	t, p, err := c.Next(5 * time.Second)
	if err != nil {
		return "", err
	}
	if t != rawderp.Pong || !bytes.Equal(p, data[:8]) {
		return "", fmt.Errorf("got frame 0x%02x %q, want Pong %q", t, p, data[:8])
	}
	return "12-byte Ping → 8-byte Pong of its first 8 bytes", nil
}

// checkPingCloses: §8.1, §17 item 30.
func checkPingCloses(n int) (string, error) {
	cs, done, err := clients(1)
	if err != nil {
		return "", err
	}
	defer done()
	if err := cs[0].WriteFrame(rawderp.Ping, make([]byte, n)); err != nil {
		return "", err
	}
	types, err := cs[0].ExpectClosed(5 * time.Second)
	if err != nil {
		return "", err
	}
	for _, t := range types {
		if t == rawderp.Pong {
			return "", fmt.Errorf("%d-byte Ping was answered before close", n)
		}
	}
	return fmt.Sprintf("%d-byte Ping closed the connection", n), nil
}

// checkNotePreferred: §8.7, §17 item 31.
func checkNotePreferred() (string, error) {
	cs, done, err := clients(1)
	if err != nil {
		return "", err
	}
	defer done()
	for _, v := range []byte{1, 0, 1} {
		if err := cs[0].WriteFrame(rawderp.NotePreferred, []byte{v}); err != nil {
			return "", err
		}
	}
	if err := cs[0].PingPong(3 * time.Second); err != nil {
		return "", err
	}
	return "NotePreferred 01, 00, 01 accepted", nil
}

func expectCloseAfter(t byte, payload []byte, what string) (string, error) {
	cs, done, err := clients(1)
	if err != nil {
		return "", err
	}
	defer done()
	if err := cs[0].WriteFrame(t, payload); err != nil {
		return "", err
	}
	if _, err := cs[0].ExpectClosed(5 * time.Second); err != nil {
		return "", fmt.Errorf("%s: %v", what, err)
	}
	return what + " closed the connection", nil
}

// checkNotePreferred2: §17 item 31.
func checkNotePreferred2() (string, error) {
	return expectCloseAfter(rawderp.NotePreferred, []byte{1, 1}, "2-byte NotePreferred")
}

// checkMeshOnly: §10.3, §17 item 35.
func checkMeshOnly(t byte, payload []byte) (string, error) {
	return expectCloseAfter(t, payload, fmt.Sprintf("frame 0x%02x from a non-mesh client", t))
}

// checkUnknownFrame: §7, §17 item 32.
func checkUnknownFrame() (string, error) {
	cs, done, err := clients(1)
	if err != nil {
		return "", err
	}
	defer done()
	for _, t := range []byte{0x20, 0x00, 0x0b, 0x16, 0xff} {
		if err := cs[0].WriteFrame(t, bytes.Repeat([]byte{t}, 100)); err != nil {
			return "", err
		}
	}
	if err := cs[0].PingPong(3 * time.Second); err != nil {
		return "", err
	}
	return "frames 0x20, 0x00, 0x0b, 0x16, 0xff (100 bytes each) skipped; connection alive", nil
}

// checkServerTypesFromClient: §8.1 "anything else": server-to-client frame
// types sent by a client are skipped.
func checkServerTypesFromClient() (string, error) {
	cs, done, err := clients(1)
	if err != nil {
		return "", err
	}
	defer done()
	c := cs[0]
	frames := [][2]any{
		{rawderp.ServerKey, make([]byte, 40)},
		{rawderp.ClientInfo, make([]byte, 60)},
		{rawderp.ServerInfo, make([]byte, 30)},
		{rawderp.RecvPacket, make([]byte, 40)},
		{rawderp.KeepAlive, []byte{}},
		{rawderp.Pong, make([]byte, 8)},
		{rawderp.PeerGone, make([]byte, 33)},
		{rawderp.PeerPresent, make([]byte, 51)},
	}
	for _, f := range frames {
		if err := c.WriteFrame(f[0].(byte), f[1].([]byte)); err != nil {
			return "", err
		}
	}
	if err := c.PingPong(3 * time.Second); err != nil {
		return "", err
	}
	return "ServerKey, ClientInfo (again), ServerInfo, RecvPacket, KeepAlive, Pong, PeerGone, PeerPresent from a client skipped", nil
}

// checkKeepAlive: §8.6, §17 item 33 (runs in the background).
func checkKeepAlive() (string, error) {
	c, err := connected()
	if err != nil {
		return "", err
	}
	defer c.Close()
	t0 := time.Now()
	var got []time.Duration
	for time.Since(t0) < 70*time.Second && len(got) < 1 {
		t, _, err := c.ReadFrame(70*time.Second - time.Since(t0))
		if rawderp.IsTimeout(err) {
			break
		}
		if err != nil {
			return "", err
		}
		if t == rawderp.KeepAlive {
			got = append(got, time.Since(t0))
		}
	}
	if len(got) == 0 {
		return "", fmt.Errorf("no KeepAlive within %v of an idle connection", time.Since(t0).Round(time.Second))
	}
	if got[0] < 55*time.Second || got[0] > 66*time.Second {
		return "", fmt.Errorf("first KeepAlive after %v, want 60-65 s", got[0].Round(time.Millisecond))
	}
	return fmt.Sprintf("first KeepAlive after %v on an idle connection", got[0].Round(time.Millisecond)), nil
}

// dupSetup connects C1 then C2 with one key, plus a sender S.
func dupSetup() (priv key.NodePrivate, c1, c2, s *rawderp.Conn, done func(), err error) {
	priv = key.NewNode()
	var cs []*rawderp.Conn
	done = func() {
		for _, c := range cs {
			c.Close()
		}
	}
	for _, p := range []key.NodePrivate{priv, priv, {}} {
		c, err := rawderp.Connect(ctx, &tgt, p)
		if err != nil {
			done()
			return priv, nil, nil, nil, nil, err
		}
		cs = append(cs, c)
	}
	return priv, cs[0], cs[1], cs[2], done, nil
}

// checkDupLastWriter: §9.1, §17 item 36.
func checkDupLastWriter() (string, error) {
	priv, c1, c2, s, done, err := dupSetup()
	if err != nil {
		return "", err
	}
	defer done()
	var steps []string
	deliver := func(step string, want, other *rawderp.Conn, wantName string) error {
		msg := []byte(step)
		if err := s.Send(priv.Public(), msg); err != nil {
			return err
		}
		if err := expectPacket(want, s.Pub(), msg); err != nil {
			return fmt.Errorf("%s: want delivery to %s: %v", step, wantName, err)
		}
		if err := other.Quiet(150 * time.Millisecond); err != nil {
			return fmt.Errorf("%s: the other duplicate: %v", step, err)
		}
		steps = append(steps, step+"→"+wantName)
		return nil
	}
	if err := deliver("after-C2-connects", c2, c1, "C2"); err != nil {
		return "", err
	}
	if err := c1.PingPong(3 * time.Second); err != nil { // C1 speaks
		return "", err
	}
	if err := deliver("after-C1-pings", c1, c2, "C1"); err != nil {
		return "", err
	}
	if err := c2.WriteFrame(rawderp.NotePreferred, []byte{1}); err != nil { // C2 speaks
		return "", err
	}
	time.Sleep(100 * time.Millisecond)
	if err := deliver("after-C2-writes", c2, c1, "C2"); err != nil {
		return "", err
	}
	return fmt.Sprintf("same key twice, last writer active: %v", steps), nil
}

// checkDupCloseActive: §9.1, §17 item 37.
func checkDupCloseActive() (string, error) {
	priv, c1, c2, s, done, err := dupSetup()
	if err != nil {
		return "", err
	}
	defer done()
	if err := s.Send(priv.Public(), []byte("one")); err != nil {
		return "", err
	}
	if err := expectPacket(c2, s.Pub(), []byte("one")); err != nil {
		return "", fmt.Errorf("newest duplicate C2: %v", err)
	}
	c2.Close()
	time.Sleep(300 * time.Millisecond)
	if err := s.Send(priv.Public(), []byte("two")); err != nil {
		return "", err
	}
	if err := expectPacket(c1, s.Pub(), []byte("two")); err != nil {
		return "", fmt.Errorf("after closing C2, remaining C1: %v", err)
	}
	if err := s.Quiet(300 * time.Millisecond); err != nil {
		return "", fmt.Errorf("sender must get no PeerGone when one duplicate closes: %v", err)
	}
	return "C2 (active) closed → packets go to C1; sender got no PeerGone", nil
}
