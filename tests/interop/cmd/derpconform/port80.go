package main

import (
	"bufio"
	"crypto/tls"
	"flag"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"derp-fleet/tests/interop/internal/check"
	"derp-fleet/tests/interop/internal/rawderp"
	"derp-fleet/tests/interop/internal/target"

	"tailscale.com/tailcfg"
)

var httpAddr = flag.String("http-addr", "", "host:port of the server's plain-HTTP (-http-port) listener, for the port-80 checks")

// plain sends one raw request to the plain-HTTP listener.
func plain(method, path string, headers ...string) (*httpResult, error) {
	if *httpAddr == "" {
		return nil, check.Skip("no -http-addr given (server runs with -http-port -1)")
	}
	host, port, err := net.SplitHostPort(*httpAddr)
	if err != nil {
		return nil, err
	}
	p, _ := strconv.Atoi(port)
	nc, err := net.DialTimeout("tcp", *httpAddr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	c := &rawderp.Conn{NC: nc, BR: bufio.NewReader(nc), Node: &tailcfg.DERPNode{HostName: host, DERPPort: p}}
	req := c.Request(path, headers...)
	req = append([]byte(method), req[3:]...)
	if err := c.Write(req); err != nil {
		return nil, err
	}
	head, resp, err := c.ReadHead(5 * time.Second)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %v (head %q)", method, path, err, head)
	}
	resp.Request, _ = http.NewRequest(method, "http://x"+path, nil)
	body, err := readBody(c, resp)
	if err != nil {
		return nil, err
	}
	return &httpResult{head, resp, body}, nil
}

// checkPort80: §4.1 port-80 listener, §17 item 56.
func checkPort80() (string, error) {
	r, err := plain("GET", "/generate_204?t=1", "X-Tailscale-Challenge: ts_127.0.0.1")
	if err != nil {
		return "", err
	}
	if r.resp.StatusCode != 204 || r.resp.Header.Get("X-Tailscale-Response") != "response ts_127.0.0.1" {
		return "", fmt.Errorf("port-80 /generate_204: %s, X-Tailscale-Response %q", r.resp.Status, r.resp.Header.Get("X-Tailscale-Response"))
	}
	hostHdr := target.HostHeader(&tailcfg.DERPNode{HostName: strings.Split(*httpAddr, ":")[0], DERPPort: atoiPort(*httpAddr)})
	for _, path := range []string{"/foo?x=1", "/derp"} {
		r, err = plain("GET", path, "Upgrade: DERP", "Connection: Upgrade")
		if err != nil {
			return "", err
		}
		want := "https://" + hostHdr + path
		if r.resp.StatusCode != 302 || r.resp.Header.Get("Location") != want {
			return "", fmt.Errorf("port-80 GET %s: %s Location %q, want 302 to %q (no DERP on port 80 when TLS is on)", path, r.resp.Status, r.resp.Header.Get("Location"), want)
		}
	}
	r, err = plain("POST", "/foo", "Content-Length: 0")
	if err != nil {
		return "", err
	}
	if r.resp.StatusCode != 400 {
		return "", fmt.Errorf("port-80 POST /foo: %s, want 400 Use HTTPS", r.resp.Status)
	}
	return "port 80: /generate_204 answers the challenge; GET /foo?x=1 and /derp → 302 https://<Host><uri>; POST → 400", nil
}

func atoiPort(hostport string) int {
	_, p, _ := net.SplitHostPort(hostport)
	n, _ := strconv.Atoi(p)
	return n
}

// checkALPNBrowser: §3.2. A browser offers h2 and http/1.1; the handshake must
// succeed (rustls refuses a handshake whose offered ALPN list has no overlap
// with its own). Reports what was negotiated.
func checkALPNBrowser() (string, error) {
	var notes []string
	for _, offer := range [][]string{{"h2", "http/1.1"}, {"http/1.1"}} {
		c, err := rawderp.Dial(ctx, &tgt, &tls.Config{NextProtos: offer})
		if err != nil {
			return "", fmt.Errorf("client offering ALPN %q: %v", offer, err)
		}
		got := c.TLS.ConnectionState().NegotiatedProtocol
		// The site must still work over whatever was negotiated, for http/1.1.
		if got == "http/1.1" || got == "" {
			if err := c.Write(c.Request("/robots.txt")); err != nil {
				c.Close()
				return "", err
			}
			if _, resp, err := c.ReadHead(5 * time.Second); err != nil || resp.StatusCode != 200 {
				c.Close()
				return "", fmt.Errorf("ALPN %q negotiated, GET /robots.txt over it: %v", got, err)
			}
		}
		c.Close()
		notes = append(notes, fmt.Sprintf("offer %q → %q", offer, got))
	}
	return strings.Join(notes, "; "), nil
}
