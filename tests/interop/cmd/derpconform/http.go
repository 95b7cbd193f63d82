package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"strings"
	"time"

	"derp-fleet/tests/interop/internal/rawderp"
)

// readBody reads the body of resp (whose head ReadHead consumed) from c.
func readBody(c *rawderp.Conn, resp *http.Response) ([]byte, error) {
	c.NC.SetReadDeadline(time.Now().Add(5 * time.Second))
	switch {
	case resp.Request != nil && resp.Request.Method == "HEAD", resp.StatusCode == 204, resp.StatusCode == 304:
		return nil, nil
	case len(resp.TransferEncoding) > 0 && resp.TransferEncoding[0] == "chunked":
		return io.ReadAll(io.LimitReader(httputil.NewChunkedReader(c.BR), 1<<20))
	case resp.ContentLength >= 0:
		b := make([]byte, resp.ContentLength)
		_, err := io.ReadFull(c.BR, b)
		return b, err
	default:
		return io.ReadAll(io.LimitReader(c.BR, 1<<20))
	}
}

type httpResult struct {
	head []byte
	resp *http.Response
	body []byte
}

// do sends one raw HTTP/1.1 request over a fresh TLS connection (no
// Connection: close, so the server's own choice shows) and reads the answer.
func do(method, path string, headers ...string) (*httpResult, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	req := c.Request(path, headers...)
	req = append([]byte(method), req[3:]...) // Request writes "GET"
	if err := c.Write(req); err != nil {
		return nil, err
	}
	head, resp, err := c.ReadHead(5 * time.Second)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %v (head %q)", method, path, err, head)
	}
	resp.Request, _ = http.NewRequest(method, "https://x"+path, nil)
	body, err := readBody(c, resp)
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading body: %v", method, path, err)
	}
	return &httpResult{head, resp, body}, nil
}

// checkProbe: §4.1, §17 item 54.
func checkProbe(path string) (string, error) {
	for _, m := range []string{"GET", "HEAD"} {
		r, err := do(m, path)
		if err != nil {
			return "", err
		}
		if r.resp.StatusCode != 200 {
			return "", fmt.Errorf("%s %s: %s, want 200", m, path, r.resp.Status)
		}
		if v := r.resp.Header.Get("Access-Control-Allow-Origin"); v != "*" {
			return "", fmt.Errorf("%s %s: Access-Control-Allow-Origin %q, want *", m, path, v)
		}
		if len(r.body) != 0 {
			return "", fmt.Errorf("%s %s: body %q, want empty", m, path, r.body)
		}
	}
	r, err := do("POST", path, "Content-Length: 0")
	if err != nil {
		return "", err
	}
	if r.resp.StatusCode != 405 {
		return "", fmt.Errorf("POST %s: %s, want 405", path, r.resp.Status)
	}
	return "GET/HEAD 200 with Access-Control-Allow-Origin: *, POST 405", nil
}

const cacheControl204 = "no-cache, no-store, must-revalidate, no-transform, max-age=0"

// checkGenerate204: §4.5, §17 item 55.
func checkGenerate204() (string, error) {
	type tc struct {
		challenge string // "" = no header
		respond   bool
	}
	cases := []tc{
		{"", false},
		{"ts_127.0.0.1", true},
		{"Az09._:-", true},
		{strings.Repeat("x", 64), true},
		{strings.Repeat("x", 65), false},
		{"foo bar", false},
		{"foo/bar", false},
		{"föö", false},
	}
	var notes []string
	for _, k := range cases {
		var hdr []string
		if k.challenge != "" {
			hdr = append(hdr, "X-Tailscale-Challenge: "+k.challenge)
		}
		r, err := do("GET", fmt.Sprintf("/generate_204?t=%d", time.Now().Unix()), hdr...)
		if err != nil {
			return "", err
		}
		if r.resp.StatusCode != 204 {
			return "", fmt.Errorf("challenge %q: %s, want 204", k.challenge, r.resp.Status)
		}
		if cc := r.resp.Header.Get("Cache-Control"); cc != cacheControl204 {
			return "", fmt.Errorf("Cache-Control %q, want %q", cc, cacheControl204)
		}
		got, has := r.resp.Header["X-Tailscale-Response"]
		if k.respond {
			if !has || len(got) != 1 || got[0] != "response "+k.challenge {
				return "", fmt.Errorf("challenge %q: X-Tailscale-Response %q, want %q", k.challenge, got, "response "+k.challenge)
			}
		} else if has {
			return "", fmt.Errorf("challenge %q (invalid or absent): got X-Tailscale-Response %q, want none", k.challenge, got)
		}
	}
	notes = append(notes, fmt.Sprintf("%d challenge cases: 204, Cache-Control exact, response only for ≤64 chars of [A-Za-z0-9._:-]", len(cases)))
	// A NUL byte in a header value: Go's net/http rejects the whole request
	// with 400 before the handler runs (spec §17 item 55 expects 204).
	r, err := do("GET", "/generate_204", "X-Tailscale-Challenge: foo\x00bar")
	if err != nil {
		return "", err
	}
	if _, has := r.resp.Header["X-Tailscale-Response"]; has {
		return "", errors.New("challenge with NUL byte was echoed")
	}
	notes = append(notes, fmt.Sprintf("NUL in challenge → %d without response header", r.resp.StatusCode))
	return strings.Join(notes, "; "), nil
}

// checkRobots: §17 item 57.
func checkRobots() (string, error) {
	r, err := do("GET", "/robots.txt")
	if err != nil {
		return "", err
	}
	if r.resp.StatusCode != 200 || string(r.body) != "User-agent: *\nDisallow: /\n" {
		return "", fmt.Errorf("%s body %q, want 200 %q", r.resp.Status, r.body, "User-agent: *\nDisallow: /\n")
	}
	return "200, exact body", nil
}

// checkBootstrapDNS: §4.6, §17 item 58 (server started without
// -bootstrap-dns-names: empty body).
func checkBootstrapDNS() (string, error) {
	r, err := do("GET", "/bootstrap-dns")
	if err != nil {
		return "", err
	}
	if r.resp.StatusCode != 200 {
		return "", fmt.Errorf("%s, want 200", r.resp.Status)
	}
	if !r.resp.Close && !strings.EqualFold(r.resp.Header.Get("Connection"), "close") {
		return "", fmt.Errorf("no Connection: close (head %q)", r.head)
	}
	if ct := r.resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		return "", fmt.Errorf("Content-Type %q, want application/json", ct)
	}
	b := strings.TrimSpace(string(r.body))
	if b != "" && !strings.HasPrefix(b, "{") && b != "null" {
		return "", fmt.Errorf("body %q is not a JSON object", r.body)
	}
	return fmt.Sprintf("200, Connection: close, application/json, body %q", shorten(string(r.body), 60)), nil
}

// checkHome: §4.1 catch-all: / (and unknown paths) → 200 HTML.
func checkHome() (string, error) {
	for _, p := range []string{"/", "/derp/no-such-thing"} {
		r, err := do("GET", p)
		if err != nil {
			return "", err
		}
		if r.resp.StatusCode != 200 || !strings.HasPrefix(r.resp.Header.Get("Content-Type"), "text/html") {
			return "", fmt.Errorf("GET %s: %s %q, want 200 text/html", p, r.resp.Status, r.resp.Header.Get("Content-Type"))
		}
	}
	return "GET / and /derp/no-such-thing → 200 text/html", nil
}
