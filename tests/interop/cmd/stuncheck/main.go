// Command stuncheck checks a DERP server's STUN listener with Tailscale's own
// net/stun package: real binding requests get a response with the same
// transaction id and the client's own address; malformed or non-Tailscale
// requests get no answer at all.
package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"net"
	"net/netip"
	"os"
	"time"

	"derp-fleet/tests/interop/internal/check"

	"tailscale.com/net/stun"
)

func main() {
	addr4 := flag.String("addr", "", "IPv4 STUN server host:port (e.g. 127.0.0.1:3478)")
	addr6 := flag.String("addr6", "", "optional IPv6 STUN server [::1]:port")
	n := flag.Int("n", 20, "valid requests per address family")
	silence := flag.Duration("silence", 500*time.Millisecond, "how long to wait to conclude no response is coming")
	run := flag.String("run", "", "only run checks whose name matches this regexp")
	flag.Parse()
	if *addr4 == "" && *addr6 == "" {
		fmt.Fprintln(os.Stderr, "stuncheck: give -addr and/or -addr6")
		fmt.Println("0 passed, 1 failed")
		os.Exit(1)
	}
	r := check.New("stuncheck/", *run)
	for _, fam := range []struct{ name, addr, local string }{{"ipv4", *addr4, "127.0.0.1:0"}, {"ipv6", *addr6, "[::1]:0"}} {
		if fam.addr == "" {
			continue
		}
		srv, err := netip.ParseAddrPort(fam.addr)
		if err != nil || !srv.Addr().IsLoopback() {
			fmt.Fprintf(os.Stderr, "stuncheck: %q must be a loopback ip:port\n", fam.addr)
			os.Exit(2)
		}
		local := netip.MustParseAddrPort(fam.local)
		r.Run(fam.name+"/binding", func() (string, error) { return validRequests(srv, local, *n) })
		// Positive control: the hand-built encoder that makes the malformed
		// requests below produces an answered request when nothing is wrong.
		r.Run(fam.name+"/handbuilt-valid-answered", func() (string, error) {
			pkt := build(0x0001, 0x2112A442, [][]byte{attr(0x8022, []byte("tailnode"))}, true)
			got, err := exchange(srv, local, pkt, 2*time.Second)
			if err != nil {
				return "", err
			}
			if got == nil {
				return "", errors.New("no answer to a hand-built valid request: the malformed checks would prove nothing")
			}
			return fmt.Sprintf("%d-byte hand-built request answered (%d bytes)", len(pkt), len(got)), nil
		})
		// The malformed requests go out at once, each from its own socket, so
		// the silence waits overlap; verdicts are printed in order.
		bad := malformed()
		type answer struct {
			got []byte
			err error
		}
		answers := make([]chan answer, len(bad))
		for i, m := range bad {
			answers[i] = make(chan answer, 1)
			go func() {
				got, err := exchange(srv, local, m.pkt, *silence)
				answers[i] <- answer{got, err}
			}()
		}
		for i, m := range bad {
			r.Run(fam.name+"/ignored/"+m.name, func() (string, error) {
				a := <-answers[i]
				got, err := a.got, a.err
				if err != nil {
					return "", err
				}
				if got != nil {
					return "", fmt.Errorf("server answered a %s request with %d bytes: % x", m.name, len(got), got[:min(len(got), 48)])
				}
				return fmt.Sprintf("%d-byte request, no answer within %v", len(m.pkt), *silence), nil
			})
		}
		r.Run(fam.name+"/still-alive", func() (string, error) { return validRequests(srv, local, 1) })
	}
	r.Finish()
}

// exchange sends pkt from a fresh socket bound to local and returns the first
// datagram received within wait (nil if none).
func exchange(srv, local netip.AddrPort, pkt []byte, wait time.Duration) ([]byte, error) {
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(local))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if _, err := c.WriteToUDPAddrPort(pkt, srv); err != nil {
		return nil, err
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 2048)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if from.Addr().Unmap() != srv.Addr() || from.Port() != srv.Port() {
		return nil, fmt.Errorf("datagram from unexpected %v", from)
	}
	return buf[:n], nil
}

func validRequests(srv, local netip.AddrPort, n int) (string, error) {
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(local))
	if err != nil {
		return "", err
	}
	defer c.Close()
	me := c.LocalAddr().(*net.UDPAddr).AddrPort()
	var total time.Duration
	fams := map[byte]int{}
	buf := make([]byte, 2048)
	for i := 0; i < n; i++ {
		tx := stun.NewTxID()
		req := stun.Request(tx)
		t0 := time.Now()
		if _, err := c.WriteToUDPAddrPort(req, srv); err != nil {
			return "", err
		}
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		nr, _, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return "", fmt.Errorf("request %d: no response: %v", i+1, err)
		}
		total += time.Since(t0)
		resp := buf[:nr]
		gotTx, addr, err := stun.ParseResponse(resp)
		if err != nil {
			return "", fmt.Errorf("request %d: stun.ParseResponse: %v (% x)", i+1, err, resp)
		}
		if gotTx != tx {
			return "", fmt.Errorf("request %d: txid %x, want %x", i+1, gotTx, tx)
		}
		if addr.Addr().Unmap() != me.Addr().Unmap() || addr.Port() != me.Port() {
			return "", fmt.Errorf("request %d: mapped address %v, want our socket %v", i+1, addr, me)
		}
		fam, err := checkShape(resp, tx)
		if err != nil {
			return "", fmt.Errorf("request %d: %v", i+1, err)
		}
		fams[fam]++
	}
	famNote := ""
	for f, k := range fams {
		famNote += fmt.Sprintf(" family 0x%02x×%d", f, k)
	}
	return fmt.Sprintf("%d/%d answered, mapped address = %v,%s, avg rtt %v", n, n, me, famNote, (total / time.Duration(n)).Round(time.Microsecond)), nil
}

// checkShape checks the raw response: Binding Success, only
// XOR-MAPPED-ADDRESS, 32 bytes for family 1 and 44 for family 2 (spec §14.2;
// Go answers IPv4 clients of a dual-stack socket with family 2).
func checkShape(b []byte, tx stun.TxID) (family byte, err error) {
	if len(b) < 20 || b[0] != 0x01 || b[1] != 0x01 {
		return 0, fmt.Errorf("not a Binding Success response: % x", b[:min(4, len(b))])
	}
	if string(b[8:20]) != string(tx[:]) {
		return 0, errors.New("txid mismatch in header")
	}
	if len(b) < 32 || b[20] != 0x00 || b[21] != 0x20 {
		return 0, fmt.Errorf("first attribute is not XOR-MAPPED-ADDRESS: % x", b)
	}
	family = b[25]
	want := map[byte]int{1: 32, 2: 44}[family]
	if want == 0 || len(b) != want || int(binary.BigEndian.Uint16(b[2:4])) != want-20 {
		return 0, fmt.Errorf("family %d response is %d bytes (header length %d); want exactly one XOR-MAPPED-ADDRESS, %d bytes", family, len(b), binary.BigEndian.Uint16(b[2:4]), want)
	}
	return family, nil
}

type badReq struct {
	name string
	pkt  []byte
}

func fingerprint(b []byte) []byte {
	return binary.BigEndian.AppendUint32(nil, crc32.ChecksumIEEE(b)^0x5354554e)
}

// build assembles a STUN message from a header and attributes, optionally
// appending a correct FINGERPRINT.
func build(msgType uint16, cookie uint32, attrs [][]byte, withFP bool) []byte {
	var body []byte
	for _, a := range attrs {
		body = append(body, a...)
	}
	total := len(body)
	if withFP {
		total += 8
	}
	b := binary.BigEndian.AppendUint16(nil, msgType)
	b = binary.BigEndian.AppendUint16(b, uint16(total))
	b = binary.BigEndian.AppendUint32(b, cookie)
	tx := stun.NewTxID()
	b = append(b, tx[:]...)
	b = append(b, body...)
	if withFP {
		b = append(b, 0x80, 0x28, 0x00, 0x04)
		b = append(b, fingerprint(b[:len(b)-4])...)
	}
	return b
}

func attr(t uint16, v []byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, t)
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	b = append(b, v...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func malformed() []badReq {
	const cookie = 0x2112A442
	sw := attr(0x8022, []byte("tailnode"))
	valid := stun.Request(stun.NewTxID())
	badFP := append([]byte(nil), valid...)
	badFP[len(badFP)-1] ^= 0xff
	fpNotLast := func() []byte {
		b := build(0x0001, cookie, [][]byte{sw}, true)
		b = append(b, attr(0x8023, []byte("xyz!"))...) // attribute after FINGERPRINT
		binary.BigEndian.PutUint16(b[2:4], uint16(len(b)-20))
		return b
	}()
	truncated := func() []byte {
		b := build(0x0001, cookie, [][]byte{sw}, true)
		return append(b, 0x80, 0x22, 0x00, 0x10, 't') // attribute claims 16 bytes, has 1
	}()
	return []badReq{
		{"wrong-software", build(0x0001, cookie, [][]byte{attr(0x8022, []byte("tailnodX"))}, true)},
		{"no-software-rfc5389", build(0x0001, cookie, nil, true)},
		{"missing-fingerprint", build(0x0001, cookie, [][]byte{sw}, false)},
		{"bad-fingerprint", badFP},
		{"fingerprint-not-last", fpNotLast},
		{"not-binding-request", build(0x0101, cookie, [][]byte{sw}, true)},
		{"bad-cookie", build(0x0001, 0x2112A443, [][]byte{sw}, true)},
		{"short-19-bytes", valid[:19]},
		{"truncated-attribute", truncated},
		{"not-stun", []byte("GET / HTTP/1.1\r\n\r\n")},
	}
}
