package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"derp-fleet/tests/interop/internal/rawderp"

	"tailscale.com/types/key"
)

// wsConn is a minimal RFC 6455 client over a raw connection: it writes
// masked binary messages and turns received binary messages back into the
// DERP byte stream.
type wsConn struct {
	c   *rawderp.Conn
	buf bytes.Buffer // received DERP bytes not yet consumed
}

func (w *wsConn) writeMessage(payload []byte) error {
	h := []byte{0x82} // FIN + binary
	switch n := len(payload); {
	case n < 126:
		h = append(h, 0x80|byte(n))
	case n < 1<<16:
		h = append(h, 0x80|126)
		h = binary.BigEndian.AppendUint16(h, uint16(n))
	default:
		h = append(h, 0x80|127)
		h = binary.BigEndian.AppendUint64(h, uint64(n))
	}
	var mask [4]byte
	rand.Read(mask[:])
	h = append(h, mask[:]...)
	m := make([]byte, len(payload))
	for i := range payload {
		m[i] = payload[i] ^ mask[i%4]
	}
	return w.c.Write(append(h, m...))
}

// fill reads one WebSocket frame into buf.
func (w *wsConn) fill(d time.Duration) error {
	w.c.NC.SetReadDeadline(time.Now().Add(d))
	var h [2]byte
	if _, err := io.ReadFull(w.c.BR, h[:]); err != nil {
		return err
	}
	op := h[0] & 0x0f
	if h[1]&0x80 != 0 {
		return errors.New("server sent a masked frame")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		if _, err := io.ReadFull(w.c.BR, b[:]); err != nil {
			return err
		}
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		if _, err := io.ReadFull(w.c.BR, b[:]); err != nil {
			return err
		}
		n = binary.BigEndian.Uint64(b[:])
	}
	if n > 4<<20 {
		return fmt.Errorf("websocket frame of %d bytes", n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(w.c.BR, p); err != nil {
		return err
	}
	switch op {
	case 0x0, 0x2:
		w.buf.Write(p)
	case 0x8:
		return fmt.Errorf("server closed the websocket: % x", p)
	case 0x1:
		return errors.New("server sent a text message")
	}
	return nil
}

// frame returns the next DERP frame from the message stream.
func (w *wsConn) frame(d time.Duration) (byte, []byte, error) {
	deadline := time.Now().Add(d)
	for {
		b := w.buf.Bytes()
		if len(b) >= 5 {
			n := int(binary.BigEndian.Uint32(b[1:5]))
			if len(b) >= 5+n {
				t := b[0]
				p := append([]byte(nil), b[5:5+n]...)
				w.buf.Next(5 + n)
				return t, p, nil
			}
		}
		if err := w.fill(time.Until(deadline)); err != nil {
			return 0, nil, err
		}
	}
}

// checkWebSocket: §4.4, §17 item 9.
func checkWebSocket() (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	var nonce [16]byte
	rand.Read(nonce[:])
	wsKey := base64.StdEncoding.EncodeToString(nonce[:])
	req := c.Request("/derp", "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
		"Sec-WebSocket-Key: "+wsKey, "Sec-WebSocket-Protocol: derp")
	if err := c.Write(req); err != nil {
		return "", err
	}
	head, resp, err := c.ReadHead(5 * time.Second)
	if err != nil {
		return "", fmt.Errorf("%v (%q)", err, head)
	}
	if resp.StatusCode != 101 {
		return "", fmt.Errorf("status %q, want 101", resp.Status)
	}
	sum := sha1.Sum([]byte(wsKey + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if got, want := resp.Header.Get("Sec-WebSocket-Accept"), base64.StdEncoding.EncodeToString(sum[:]); got != want {
		return "", fmt.Errorf("Sec-WebSocket-Accept %q, want %q", got, want)
	}
	if p := resp.Header.Get("Sec-WebSocket-Protocol"); p != "derp" {
		return "", fmt.Errorf("Sec-WebSocket-Protocol %q, want derp", p)
	}
	w := &wsConn{c: c}
	t, p, err := w.frame(5 * time.Second)
	if err != nil {
		return "", fmt.Errorf("ServerKey over websocket: %v", err)
	}
	sk, err := rawderp.ParseServerKey(t, p)
	if err != nil {
		return "", err
	}
	// ClientInfo split across two messages.
	priv := key.NewNode()
	ci := rawderp.Frame(rawderp.ClientInfo, rawderp.ClientInfoPayload(priv, sk, rawderp.DefaultInfo))
	if err := w.writeMessage(ci[:7]); err != nil {
		return "", err
	}
	if err := w.writeMessage(ci[7:]); err != nil {
		return "", err
	}
	t, p, err = w.frame(5 * time.Second)
	if err != nil {
		return "", fmt.Errorf("ServerInfo over websocket: %v", err)
	}
	if t != rawderp.ServerInfo {
		return "", fmt.Errorf("frame 0x%02x after ClientInfo, want ServerInfo", t)
	}
	if _, ok := priv.OpenFrom(sk, p); !ok {
		return "", errors.New("ServerInfo box does not open")
	}
	// Two frames in one message: a Ping and a packet to ourselves. (Not two
	// Pings: the server holds one pending pong and may ignore the second.)
	pkt := bytes.Repeat([]byte{0xab}, 1400)
	two := append(rawderp.Frame(rawderp.Ping, []byte("pingAAAA")),
		rawderp.Frame(rawderp.SendPacket, append(priv.Public().AppendTo(nil), pkt...))...)
	if err := w.writeMessage(two); err != nil {
		return "", err
	}
	var gotPong, gotPkt bool
	for !gotPong || !gotPkt {
		t, p, err = w.frame(5 * time.Second)
		if err != nil {
			return "", fmt.Errorf("after Ping+SendPacket in one message (pong %v, packet %v): %v", gotPong, gotPkt, err)
		}
		switch {
		case t == rawderp.Pong && string(p) == "pingAAAA":
			gotPong = true
		case t == rawderp.RecvPacket && len(p) == 32+len(pkt) && bytes.Equal(p[32:], pkt):
			gotPkt = true
		case t == rawderp.KeepAlive:
		default:
			return "", fmt.Errorf("unexpected frame 0x%02x (%d bytes)", t, len(p))
		}
	}
	return "101 with Sec-WebSocket-Protocol: derp and correct Accept; ClientInfo split over 2 messages, Ping + 1400-byte self-send in 1 message", nil
}
