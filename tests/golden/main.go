// Command golden prints test vectors produced by Tailscale's own Go code (key derivation,
// NaCl box sealing as derp.ClientInfo/ServerInfo use it, STUN request/response bytes and the
// frames a derp.Client writes). The Rust unit tests read the JSON it prints
// (derper/proto/tests/fixtures/go-golden.json), so our codec is checked against Go's bytes.
//
// Regenerate: cd tests/golden && GOTOOLCHAIN=local go run . > ../../derper/proto/tests/fixtures/go-golden.json
package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"time"

	"go4.org/mem"
	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
	"tailscale.com/derp"
	"tailscale.com/net/stun"
	"tailscale.com/types/key"
)

type vectors struct {
	Provenance        string
	ClientPrivate     string
	ClientPublic      string
	ServerPrivate     string
	ServerPublic      string
	Nonce             string
	ClientInfoJSON    string
	ClientInfoSealed  string
	ServerInfoJSON    string
	ServerInfoSealed  string
	StunTxID          string
	StunRequest       string
	StunResponseV4    string
	StunResponseV6    string
	ClientFrames      string
	ClientFramesNotes string
	// The first 37 bytes (header + client key) of the ClientInfo frame and its whole length;
	// the rest is sealed with a random nonce.
	ClientInfoFrameHead string
	ClientInfoFrameLen  int
}

// fakeConn is the derp.Conn the client writes into.
type fakeConn struct{ bytes.Buffer }

func (*fakeConn) Close() error                     { return nil }
func (*fakeConn) LocalAddr() net.Addr              { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }
func (*fakeConn) SetDeadline(time.Time) error      { return nil }
func (*fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (*fakeConn) SetWriteDeadline(time.Time) error { return nil }


func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

func pub(priv [32]byte) [32]byte {
	var p [32]byte
	out, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		panic(err)
	}
	copy(p[:], out)
	return p
}

func main() {
	var cpriv, spriv [32]byte
	copy(cpriv[:], mustHex("a8ad3bcbbb7da7cd0ee8b92a2ab5afeb2fc14b6b2f4a5b8d7e03d2e3c2f0b15e"))
	copy(spriv[:], mustHex("d0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdce4f"))
	cpub, spub := pub(cpriv), pub(spriv)
	var nonce [24]byte
	copy(nonce[:], mustHex("000102030405060708090a0b0c0d0e0f1011121314151617"))

	ci := `{"version":2,"CanAckPings":true}`
	sealedCI := box.Seal(nonce[:], []byte(ci), &nonce, &spub, &cpriv)
	si := `{"version":2}`
	sealedSI := box.Seal(nonce[:], []byte(si), &nonce, &cpub, &spriv)

	txid := stun.TxID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	req := stun.Request(txid)
	r4 := stun.Response(txid, netip.MustParseAddrPort("192.0.2.7:41641"))
	r6 := stun.Response(txid, netip.MustParseAddrPort("[2001:db8::7]:41641"))

	// Frames a real derp.Client writes after the handshake. The client is handed a ServerKey
	// frame to read; its ClientInfo (random nonce) is cut off, the frames after it are kept.
	var serverKeyFrame bytes.Buffer
	serverKeyFrame.Write([]byte{1, 0, 0, 0, 40})
	serverKeyFrame.WriteString("DERP\xf0\x9f\x94\x91")
	serverKeyFrame.Write(spub[:])
	conn := &fakeConn{}
	brw := bufio.NewReadWriter(bufio.NewReader(&serverKeyFrame), bufio.NewWriter(conn))
	c, err := derp.NewClient(key.NodePrivateFromRaw32(mem.B(cpriv[:])), conn, brw, func(string, ...any) {})
	if err != nil {
		panic(err)
	}
	afterHandshake := conn.Len()
	if err := c.Send(key.NodePublicFromRaw32(mem.B(spub[:])), []byte("hello")); err != nil {
		panic(err)
	}
	if err := c.NotePreferred(true); err != nil {
		panic(err)
	}
	if err := c.SendPing([8]byte{1, 2, 3, 4, 5, 6, 7, 8}); err != nil {
		panic(err)
	}
	if err := c.SendPong([8]byte{8, 7, 6, 5, 4, 3, 2, 1}); err != nil {
		panic(err)
	}
	if err := c.ForwardPacket(key.NodePublicFromRaw32(mem.B(cpub[:])), key.NodePublicFromRaw32(mem.B(spub[:])), []byte("fwd")); err != nil {
		panic(err)
	}
	if err := c.WatchConnectionChanges(); err != nil {
		panic(err)
	}
	if err := c.ClosePeer(key.NodePublicFromRaw32(mem.B(spub[:]))); err != nil {
		panic(err)
	}
	clientFrames := conn.Bytes()[afterHandshake:]
	clientInfoFrame := conn.Bytes()[:afterHandshake]

	v := vectors{
		Provenance:       "tests/golden/main.go with tailscale.com v1.102.3, golang.org/x/crypto nacl/box",
		ClientPrivate:    hex.EncodeToString(cpriv[:]),
		ClientPublic:     hex.EncodeToString(cpub[:]),
		ServerPrivate:    hex.EncodeToString(spriv[:]),
		ServerPublic:     hex.EncodeToString(spub[:]),
		Nonce:            hex.EncodeToString(nonce[:]),
		ClientInfoJSON:   ci,
		ClientInfoSealed: hex.EncodeToString(sealedCI),
		ServerInfoJSON:   si,
		ServerInfoSealed: hex.EncodeToString(sealedSI),
		StunTxID:         hex.EncodeToString(txid[:]),
		StunRequest:      hex.EncodeToString(req),
		StunResponseV4:   hex.EncodeToString(r4),
		StunResponseV6:   hex.EncodeToString(r6),
		ClientFrames:     hex.EncodeToString(clientFrames),
		ClientFramesNotes: "derp.Client: Send(server key, hello), NotePreferred(true), SendPing(01..08), " +
			"SendPong(08..01), ForwardPacket(client key, server key, fwd), WatchConnectionChanges, ClosePeer(server key)",
		ClientInfoFrameHead: hex.EncodeToString(clientInfoFrame[:5+32]),
		ClientInfoFrameLen:  len(clientInfoFrame),
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		panic(err)
	}
}
