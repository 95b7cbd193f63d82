package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"derp-fleet/tests/interop/internal/rawderp"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/types/key"
)

func contextTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, d)
}

// metacertKey returns the server key from the metacert of c's chain.
func metacertKey(c *rawderp.Conn) (key.NodePublic, error) {
	var last *x509.Certificate
	for _, cc := range c.TLS.ConnectionState().PeerCertificates {
		if isMetacert(cc) {
			last = cc
			break
		}
	}
	if last == nil {
		return key.NodePublic{}, errors.New("no metacert in the chain")
	}
	return key.ParseNodePublicUntyped(mem.S(strings.TrimPrefix(last.Subject.CommonName, "derpkey")))
}

// checkNoUpgrade: §4.2 step 3, §17 item 5.
func checkNoUpgrade() (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.Write(c.Request("/derp")); err != nil {
		return "", err
	}
	_, resp, err := c.ReadHead(5 * time.Second)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 426 {
		return "", fmt.Errorf("status %q, want 426", resp.Status)
	}
	body, err := readBody(c, resp)
	if err != nil {
		return "", err
	}
	if string(body) != "DERP requires connection upgrade\n" {
		return "", fmt.Errorf("body %q, want %q", body, "DERP requires connection upgrade\n")
	}
	return fmt.Sprintf("426, body %q", body), nil
}

// checkClassic101: §4.2 step 5, §17 items 6 and 11.
func checkClassic101() (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.Write(c.Request("/derp", "Connection: Upgrade", "Upgrade: DERP")); err != nil {
		return "", err
	}
	head, _, err := c.ReadHead(5 * time.Second)
	if err != nil {
		return "", fmt.Errorf("%v (got %q)", err, head)
	}
	t, p, err := c.ReadFrame(5 * time.Second)
	if err != nil {
		return "", fmt.Errorf("no ServerKey frame after the 101: %v", err)
	}
	k, err := rawderp.ParseServerKey(t, p)
	if err != nil {
		return "", err
	}
	if len(p) != 40 {
		return "", fmt.Errorf("ServerKey payload %d bytes, want 40 (45-byte frame)", len(p))
	}
	want := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: " + k.UntypedHexString() + "\r\n\r\n"
	if string(head) != want {
		return "", fmt.Errorf("101 head differs:\n got %q\nwant %q", head, want)
	}
	mk, err := metacertKey(c)
	if err == nil && mk != k {
		return "", fmt.Errorf("metacert key %v != ServerKey %v", mk, k)
	}
	return fmt.Sprintf("exact %d-byte 101 head + 45-byte ServerKey (key %s, = metacert)", len(head), k.ShortString()), nil
}

func expect101(extra ...string) (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	lines := append([]string{"Connection: Upgrade"}, extra...)
	if err := c.Write(c.Request("/derp", lines...)); err != nil {
		return "", err
	}
	head, resp, err := c.ReadHead(5 * time.Second)
	if err != nil {
		return "", fmt.Errorf("%v (got %q)", err, head)
	}
	if resp.StatusCode != 101 {
		return "", fmt.Errorf("status %q, want 101", resp.Status)
	}
	if !strings.EqualFold(resp.Header.Get("Upgrade"), "DERP") {
		return "", fmt.Errorf("101 with Upgrade %q, want DERP", resp.Header.Get("Upgrade"))
	}
	t, p, err := c.ReadFrame(5 * time.Second)
	if err != nil {
		return "", err
	}
	if _, err := rawderp.ParseServerKey(t, p); err != nil {
		return "", err
	}
	c.ServerKey, _ = rawderp.ParseServerKey(t, p)
	if err := c.Login(nil); err != nil {
		return "", err
	}
	return fmt.Sprintf("request with %q → 101 Upgrade: DERP, ServerKey, ServerInfo", extra), nil
}

func checkUpgradeLower() (string, error)  { return expect101("Upgrade: derp") }
func checkFastStartZero() (string, error) { return expect101("Upgrade: DERP", "Derp-Fast-Start: 0") }

// checkWebSocketLegacy: §17 item 10 (old clients sent Upgrade: websocket but
// spoke raw DERP).
func checkWebSocketLegacy() (string, error) { return expect101("Upgrade: websocket") }

var serverKeyPrefix = append([]byte{1, 0, 0, 0, 40}, derp.Magic...)

// checkFastStart: §4.3, §17 item 7: no HTTP bytes at all, DERP frames first.
func checkFastStart() (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	mk, err := metacertKey(c)
	if err != nil {
		return "", err
	}
	if err := c.Write(c.Request("/derp", "Connection: Upgrade", "Derp-Fast-Start: 1", "Upgrade: DERP")); err != nil {
		return "", err
	}
	c.NC.SetReadDeadline(time.Now().Add(5 * time.Second))
	first := make([]byte, 13)
	if _, err := io.ReadFull(c.BR, first); err != nil {
		return "", fmt.Errorf("reading first 13 bytes: %v", err)
	}
	if bytes.HasPrefix(first, []byte("HTTP/")) {
		return "", fmt.Errorf("server wrote an HTTP response in fast-start mode: %q", first)
	}
	if !bytes.Equal(first, serverKeyPrefix) {
		return "", fmt.Errorf("first bytes % x, want % x (ServerKey)", first, serverKeyPrefix)
	}
	rest := make([]byte, 32)
	if _, err := io.ReadFull(c.BR, rest); err != nil {
		return "", err
	}
	if !bytes.Equal(rest, mk.AppendTo(nil)) {
		return "", errors.New("ServerKey frame key != metacert key")
	}
	c.ServerKey = mk
	if err := c.Login(nil); err != nil {
		return "", err
	}
	return "first bytes after TLS: 01 00 00 00 28 44 45 52 50 f0 9f 94 91 + key; ServerInfo follows", nil
}

// checkFastStartOneWrite: §17 item 8: request and ClientInfo in one TLS
// record must both be consumed, as the Go client sends them.
func checkFastStartOneWrite() (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	mk, err := metacertKey(c)
	if err != nil {
		return "", err
	}
	c.ServerKey = mk
	c.Priv = key.NewNode()
	req := c.Request("/derp", "Connection: Upgrade", "Upgrade: DERP", "Derp-Fast-Start: 1")
	ci := rawderp.Frame(rawderp.ClientInfo, rawderp.ClientInfoPayload(c.Priv, mk, rawderp.DefaultInfo))
	np := rawderp.Frame(rawderp.NotePreferred, []byte{1})
	if err := c.Write(append(append(req, ci...), np...)); err != nil {
		return "", err
	}
	t, p, err := c.ReadFrame(5 * time.Second)
	if err != nil {
		return "", fmt.Errorf("no frame: %v", err)
	}
	if _, err := rawderp.ParseServerKey(t, p); err != nil {
		return "", err
	}
	if _, err := c.ReadServerInfo(5 * time.Second); err != nil {
		return "", err
	}
	if err := c.PingPong(3 * time.Second); err != nil {
		return "", err
	}
	return fmt.Sprintf("one %d-byte write (request+ClientInfo+NotePreferred) → ServerKey, ServerInfo, pong", len(req)+len(ci)+len(np)), nil
}
