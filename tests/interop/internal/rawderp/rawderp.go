// Package rawderp speaks DERP frame by frame over a TLS connection, so that
// conformance checks can send what Tailscale's own client never would and see
// exactly which bytes the server answers with.
package rawderp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"derp-fleet/tests/interop/internal/target"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// Frame types (spec §7), as bytes.
const (
	ServerKey     = byte(derp.FrameServerKey)
	ClientInfo    = byte(derp.FrameClientInfo)
	ServerInfo    = byte(derp.FrameServerInfo)
	SendPacket    = byte(derp.FrameSendPacket)
	RecvPacket    = byte(derp.FrameRecvPacket)
	KeepAlive     = byte(derp.FrameKeepAlive)
	NotePreferred = byte(derp.FrameNotePreferred)
	PeerGone      = byte(derp.FramePeerGone)
	PeerPresent   = byte(derp.FramePeerPresent)
	ForwardPacket = byte(derp.FrameForwardPacket)
	WatchConns    = byte(derp.FrameWatchConns)
	ClosePeer     = byte(derp.FrameClosePeer)
	Ping          = byte(derp.FramePing)
	Pong          = byte(derp.FramePong)
)

// MaxClientFrame is the largest frame a Go client accepts (spec §5).
const MaxClientFrame = 1 << 20

// Conn is one raw connection to a DERP server.
type Conn struct {
	NC        net.Conn
	TLS       *tls.Conn
	Node      *tailcfg.DERPNode
	BR        *bufio.Reader
	Priv      key.NodePrivate
	ServerKey key.NodePublic
	Head      []byte // raw HTTP response head, if the server sent one
}

// Dial opens TCP+TLS to the target exactly as derphttp does (pinning,
// InsecureForTests, SNI rules); base may cap TLS versions.
func Dial(ctx context.Context, t *target.Target, base *tls.Config) (*Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	tc, node, err := t.DialTLS(ctx, base, logger.Discard)
	if err != nil {
		return nil, err
	}
	return &Conn{NC: tc, TLS: tc, Node: node, BR: bufio.NewReaderSize(tc, 64<<10)}, nil
}

// Close closes the connection.
func (c *Conn) Close() error { return c.NC.Close() }

// Write writes raw bytes with a 5 s deadline.
func (c *Conn) Write(b []byte) error {
	c.NC.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := c.NC.Write(b)
	return err
}

// Frame encodes one frame.
func Frame(t byte, payload []byte) []byte {
	b := make([]byte, 5, 5+len(payload))
	b[0] = t
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	return append(b, payload...)
}

// WriteFrame writes one frame.
func (c *Conn) WriteFrame(t byte, payload []byte) error { return c.Write(Frame(t, payload)) }

// ErrTooLong is returned for a frame above the Go client's 1 MiB limit.
var ErrTooLong = errors.New("server sent a frame longer than 1 MiB (Go clients drop the connection)")

// ReadFrame reads one frame, waiting at most d.
func (c *Conn) ReadFrame(d time.Duration) (byte, []byte, error) {
	c.NC.SetReadDeadline(time.Now().Add(d))
	var h [5]byte
	if _, err := io.ReadFull(c.BR, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > MaxClientFrame {
		return h[0], nil, fmt.Errorf("%w: type 0x%02x length %d", ErrTooLong, h[0], n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(c.BR, p); err != nil {
		return h[0], nil, err
	}
	return h[0], p, nil
}

// IsTimeout reports whether err is a read deadline expiry.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// ExpectClosed reads until the server closes the connection (EOF, reset,
// TLS alert) within d. It returns the types of frames that arrived first, and
// an error if the connection is still open after d.
func (c *Conn) ExpectClosed(d time.Duration) ([]byte, error) {
	deadline := time.Now().Add(d)
	var types []byte
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return types, fmt.Errorf("connection still open after %v (frames seen: %s)", d, TypeNames(types))
		}
		t, _, err := c.ReadFrame(left)
		if err != nil {
			if IsTimeout(err) {
				return types, fmt.Errorf("connection still open after %v (frames seen: %s)", d, TypeNames(types))
			}
			return types, nil
		}
		types = append(types, t)
	}
}

// TypeNames renders frame types for messages.
func TypeNames(ts []byte) string {
	if len(ts) == 0 {
		return "none"
	}
	var s []string
	for _, t := range ts {
		s = append(s, fmt.Sprintf("0x%02x", t))
	}
	return strings.Join(s, ",")
}

// Request returns the HTTP upgrade request bytes as derphttp writes them,
// with extra header lines (each "Name: value") appended.
func (c *Conn) Request(path string, extra ...string) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: Go-http-client/1.1\r\n", path, target.HostHeader(c.Node))
	for _, h := range extra {
		b.WriteString(h + "\r\n")
	}
	b.WriteString("\r\n")
	return b.Bytes()
}

// ReadHead reads an HTTP response head (through the blank line) and returns
// its raw bytes, leaving what follows in the buffer.
func (c *Conn) ReadHead(d time.Duration) ([]byte, *http.Response, error) {
	c.NC.SetReadDeadline(time.Now().Add(d))
	var head []byte
	for !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
		b, err := c.BR.ReadByte()
		if err != nil {
			return head, nil, fmt.Errorf("reading response head after %d bytes: %v", len(head), err)
		}
		head = append(head, b)
		if len(head) > 16<<10 {
			return head, nil, errors.New("response head over 16 KiB")
		}
	}
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(head)), nil)
	return head, resp, err
}

// ParseServerKey checks a ServerKey frame payload and returns the key.
func ParseServerKey(t byte, p []byte) (key.NodePublic, error) {
	if t != ServerKey {
		return key.NodePublic{}, fmt.Errorf("first frame type 0x%02x, want 0x01 ServerKey", t)
	}
	if len(p) < 40 || string(p[:8]) != derp.Magic {
		return key.NodePublic{}, fmt.Errorf("bad ServerKey payload (%d bytes): % x", len(p), p[:min(len(p), 16)])
	}
	return key.NodePublicFromRaw32(mem.B(p[8:40])), nil
}

// Upgrade sends the classic upgrade request and reads the 101 and ServerKey.
func (c *Conn) Upgrade(extra ...string) error {
	req := c.Request("/derp", append([]string{"Connection: Upgrade", "Upgrade: DERP"}, extra...)...)
	if err := c.Write(req); err != nil {
		return err
	}
	head, resp, err := c.ReadHead(5 * time.Second)
	c.Head = head
	if err != nil {
		return err
	}
	if resp.StatusCode != 101 {
		return fmt.Errorf("upgrade answered %q", resp.Status)
	}
	t, p, err := c.ReadFrame(5 * time.Second)
	if err != nil {
		return fmt.Errorf("reading ServerKey: %v", err)
	}
	c.ServerKey, err = ParseServerKey(t, p)
	return err
}

// ClientInfoPayload seals info from priv to the server key.
func ClientInfoPayload(priv key.NodePrivate, server key.NodePublic, info []byte) []byte {
	p := priv.Public().AppendTo(nil)
	return append(p, priv.SealTo(server, info)...)
}

// DefaultInfo is what tailscaled sends.
var DefaultInfo = []byte(`{"version":2,"CanAckPings":true}`)

// ReadServerInfo reads the next frame, which must be ServerInfo, and returns
// its decrypted JSON.
func (c *Conn) ReadServerInfo(d time.Duration) ([]byte, error) {
	t, p, err := c.ReadFrame(d)
	if err != nil {
		return nil, fmt.Errorf("waiting for ServerInfo: %v", err)
	}
	if t != ServerInfo {
		return nil, fmt.Errorf("frame after ClientInfo is 0x%02x (%d bytes), want ServerInfo 0x03", t, len(p))
	}
	msg, ok := c.Priv.OpenFrom(c.ServerKey, p)
	if !ok {
		return nil, errors.New("ServerInfo box does not open with the server key")
	}
	var si struct{ Version int }
	if err := json.Unmarshal(msg, &si); err != nil {
		return msg, fmt.Errorf("ServerInfo JSON %q: %v", msg, err)
	}
	if si.Version != derp.ProtocolVersion {
		return msg, fmt.Errorf("ServerInfo %s: version %d, want 2", msg, si.Version)
	}
	return msg, nil
}

// Login sends ClientInfo with info (DefaultInfo if nil) and reads ServerInfo.
func (c *Conn) Login(info []byte) error {
	if c.Priv.IsZero() {
		c.Priv = key.NewNode()
	}
	if info == nil {
		info = DefaultInfo
	}
	if err := c.WriteFrame(ClientInfo, ClientInfoPayload(c.Priv, c.ServerKey, info)); err != nil {
		return err
	}
	_, err := c.ReadServerInfo(5 * time.Second)
	return err
}

// Connect dials, upgrades (classic) and logs in with a fresh key, or priv.
func Connect(ctx context.Context, t *target.Target, priv key.NodePrivate) (*Conn, error) {
	c, err := Dial(ctx, t, nil)
	if err != nil {
		return nil, err
	}
	c.Priv = priv
	if err := c.Upgrade(); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.Login(nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Pub is the client's public key.
func (c *Conn) Pub() key.NodePublic { return c.Priv.Public() }

// Send writes a SendPacket frame.
func (c *Conn) Send(dst key.NodePublic, pkt []byte) error {
	return c.WriteFrame(SendPacket, append(dst.AppendTo(nil), pkt...))
}

// Next returns the next frame other than KeepAlive within d.
func (c *Conn) Next(d time.Duration) (byte, []byte, error) {
	deadline := time.Now().Add(d)
	for {
		t, p, err := c.ReadFrame(time.Until(deadline))
		if err != nil || t != KeepAlive {
			return t, p, err
		}
	}
}

// Recv waits for a RecvPacket and returns its source and content.
func (c *Conn) Recv(d time.Duration) (key.NodePublic, []byte, error) {
	t, p, err := c.Next(d)
	if err != nil {
		return key.NodePublic{}, nil, err
	}
	if t != RecvPacket || len(p) < 32 {
		return key.NodePublic{}, nil, fmt.Errorf("got frame 0x%02x (%d bytes), want RecvPacket", t, len(p))
	}
	return key.NodePublicFromRaw32(mem.B(p[:32])), p[32:], nil
}

// Quiet checks that nothing but KeepAlives arrives within d.
func (c *Conn) Quiet(d time.Duration) error {
	t, p, err := c.Next(d)
	if IsTimeout(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("connection broke: %v", err)
	}
	return fmt.Errorf("unexpected frame 0x%02x (%d bytes): % x", t, len(p), p[:min(len(p), 40)])
}

// PingPong sends a Ping and waits for the matching Pong (other frames are
// skipped), proving the connection is alive.
func (c *Conn) PingPong(d time.Duration) error {
	data := []byte{'a', 'l', 'i', 'v', 'e', '?', byte(time.Now().UnixNano()), 7}
	if err := c.WriteFrame(Ping, data); err != nil {
		return fmt.Errorf("connection not usable: %v", err)
	}
	deadline := time.Now().Add(d)
	for {
		t, p, err := c.ReadFrame(time.Until(deadline))
		if err != nil {
			return fmt.Errorf("no pong (connection dead?): %v", err)
		}
		if t == Pong && bytes.Equal(p, data) {
			return nil
		}
	}
}

// Disco returns an n-byte (n ≥ 62) disco-shaped packet.
func Disco(n int) []byte {
	b := make([]byte, n)
	copy(b, "TS\xf0\x9f\x92\xac")
	return b
}
