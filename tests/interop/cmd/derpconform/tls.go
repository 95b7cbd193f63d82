package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"derp-fleet/tests/interop/internal/rawderp"
	"derp-fleet/tests/interop/internal/target"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

var oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}

func isMetacert(c *x509.Certificate) bool { return strings.HasPrefix(c.Subject.CommonName, "derpkey") }

// checkMetacert: spec §3.3 and §17 item 1.
func checkMetacert() (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	cs := c.TLS.ConnectionState()
	if cs.Version != tls.VersionTLS13 {
		return "", fmt.Errorf("negotiated %s, want TLS 1.3 (fast start needs it)", tls.VersionName(cs.Version))
	}
	if cs.NegotiatedProtocol != "" {
		return "", fmt.Errorf("server negotiated ALPN %q although the client offered none", cs.NegotiatedProtocol)
	}
	certs := cs.PeerCertificates
	if len(certs) < 2 {
		return "", fmt.Errorf("chain has %d certificate(s); want leaf + metacert", len(certs))
	}
	mc := certs[len(certs)-1]
	if !isMetacert(mc) {
		return "", fmt.Errorf("last certificate CN %q, want derpkey<hex>", mc.Subject.CommonName)
	}
	for i, cc := range certs[:len(certs)-1] {
		if isMetacert(cc) {
			return "", fmt.Errorf("certificate %d of %d is a metacert; it must be last", i+1, len(certs))
		}
	}
	if n := len(certs) - 1; strings.HasPrefix(c.Node.CertName, "sha256-raw:") && n != 1 {
		return "", fmt.Errorf("%d non-metacert certificates; sha256-raw pinning needs exactly one", n)
	}
	hexKey := strings.TrimPrefix(mc.Subject.CommonName, "derpkey")
	if len(hexKey) != 64 || strings.ToLower(hexKey) != hexKey {
		return "", fmt.Errorf("CN %q: want derpkey + 64 lowercase hex", mc.Subject.CommonName)
	}
	if len(mc.Subject.Names) != 1 {
		return "", fmt.Errorf("subject has %d attributes, want exactly CN", len(mc.Subject.Names))
	}
	if !bytes.Equal(mc.RawSubject, mc.RawIssuer) {
		return "", errors.New("metacert issuer != subject")
	}
	if mc.SerialNumber.Int64() != 2 || !mc.SerialNumber.IsInt64() {
		return "", fmt.Errorf("serial %v, want 2", mc.SerialNumber)
	}
	if len(mc.Extensions) != 1 || !mc.Extensions[0].Id.Equal(oidBasicConstraints) {
		var ids []string
		for _, e := range mc.Extensions {
			ids = append(ids, e.Id.String())
		}
		return "", fmt.Errorf("extensions %v, want exactly one basicConstraints (2.5.29.19)", ids)
	}
	ext := mc.Extensions[0]
	if !ext.Critical || !bytes.Equal(ext.Value, []byte{0x30, 0x00}) {
		return "", fmt.Errorf("basicConstraints critical=%v value % x; want critical, empty SEQUENCE (30 00)", ext.Critical, ext.Value)
	}
	if len(mc.SubjectKeyId) != 0 || len(mc.AuthorityKeyId) != 0 {
		return "", errors.New("metacert carries SubjectKeyId/AuthorityKeyId (derpprobe would start checking its expiry)")
	}
	if mc.PublicKeyAlgorithm != x509.Ed25519 || mc.SignatureAlgorithm != x509.PureEd25519 {
		return "", fmt.Errorf("metacert key %v / signature %v, want Ed25519", mc.PublicKeyAlgorithm, mc.SignatureAlgorithm)
	}
	if err := mc.CheckSignature(mc.SignatureAlgorithm, mc.RawTBSCertificate, mc.Signature); err != nil {
		return "", fmt.Errorf("metacert is not validly self-signed: %v", err)
	}
	now := time.Now()
	if now.Before(mc.NotBefore) || now.After(mc.NotAfter) {
		return "", fmt.Errorf("metacert validity %v..%v does not cover now", mc.NotBefore, mc.NotAfter)
	}
	// The key in the CN must be the server's DERP key (ServerKey frame).
	if err := c.Upgrade(); err != nil {
		return "", fmt.Errorf("upgrade after TLS: %v", err)
	}
	if got := c.ServerKey.UntypedHexString(); got != hexKey {
		return "", fmt.Errorf("metacert key %s != ServerKey frame key %s", hexKey, got)
	}
	return fmt.Sprintf("TLS 1.3, no ALPN, %d certs, last CN derpkey%s… serial 2, 1 critical basicConstraints, no SKI/AKI, Ed25519, valid %s..%s, key = ServerKey",
		len(certs), hexKey[:8], mc.NotBefore.Format("2006-01-02"), mc.NotAfter.Format("2006-01-02")), nil
}

// leafHash returns the sha256-raw CertName of the leaf the server presents.
func leafHash() (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return "", err
	}
	defer c.Close()
	for _, cc := range c.TLS.ConnectionState().PeerCertificates {
		if !isMetacert(cc) {
			sum := sha256.Sum256(cc.Raw)
			return "sha256-raw:" + hex.EncodeToString(sum[:]), nil
		}
	}
	return "", errors.New("no leaf certificate")
}

// pinnedTarget returns a copy of the target whose node uses certName and no
// InsecureForTests.
func pinnedTarget(certName string) *target.Target {
	reg := tgt.Region.Clone()
	n := reg.Nodes[0]
	n.CertName = certName
	n.InsecureForTests = false
	reg.Nodes = []*tailcfg.DERPNode{n}
	t := tgt
	t.Region = reg
	t.URL = ""
	return &t
}

func derphttpConnect(t *target.Target) error {
	dc, err := t.NewClient(key.NodePrivate{}, target.Logf(*verbose, "pin"))
	if err != nil {
		return err
	}
	defer dc.Close()
	cctx, cancel := contextTimeout(10 * time.Second)
	defer cancel()
	return dc.Connect(cctx)
}

// checkPinCorrect: §17 item 2, first half.
func checkPinCorrect() (string, error) {
	h, err := leafHash()
	if err != nil {
		return "", err
	}
	if err := derphttpConnect(pinnedTarget(h)); err != nil {
		return "", fmt.Errorf("derphttp with CertName %s: %v", h, err)
	}
	note := ""
	if tgt.Node().CertName != "" && tgt.Node().CertName != h {
		return "", fmt.Errorf("map CertName %s does not match the leaf (%s)", tgt.Node().CertName, h)
	}
	if tgt.Node().CertName == h {
		note = " (same as the map)"
	}
	return "derphttp Connect succeeded with CertName " + h[:24] + "…" + note, nil
}

// checkPinWrong: §17 item 2, second half.
func checkPinWrong() (string, error) {
	h, err := leafHash()
	if err != nil {
		return "", err
	}
	last := h[len(h)-1]
	flip := byte('0')
	if last == '0' {
		flip = '1'
	}
	wrong := h[:len(h)-1] + string(flip)
	err = derphttpConnect(pinnedTarget(wrong))
	if err == nil {
		return "", errors.New("derphttp connected although CertName hash is wrong")
	}
	return "refused: " + shorten(err.Error(), 140), nil
}

// checkTLS12: §17 item 3 (first half): a TLS 1.2 client gets a working classic
// DERP session (no metacert use below TLS 1.3).
func checkTLS12() (string, error) {
	c, err := rawderp.Dial(ctx, &tgt, tls12)
	if err != nil {
		return "", fmt.Errorf("TLS 1.2 handshake: %v", err)
	}
	defer c.Close()
	if v := c.TLS.ConnectionState().Version; v != tls.VersionTLS12 {
		return "", fmt.Errorf("negotiated %s", tls.VersionName(v))
	}
	if err := c.Upgrade(); err != nil {
		return "", err
	}
	if err := c.Login(nil); err != nil {
		return "", err
	}
	if err := c.PingPong(3 * time.Second); err != nil {
		return "", err
	}
	return "TLS 1.2 handshake, 101, ServerInfo, ping/pong", nil
}

// checkTLS11: §17 item 3 (second half).
func checkTLS11() (string, error) {
	_, err := rawderp.Dial(ctx, &tgt, &tls.Config{MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11})
	if err == nil {
		return "", errors.New("TLS 1.1 handshake succeeded; minimum must be 1.2")
	}
	return "refused: " + shorten(err.Error(), 120), nil
}

// checkSNI: §3.5 SNI rule, §17 item 4. For an IP HostName any or no SNI is
// accepted; for a DNS HostName the SNI must equal it.
func checkSNI() (string, error) {
	n := tgt.Node()
	try := func(sni string) error {
		d := net.Dialer{Timeout: 5 * time.Second}
		raw, err := d.DialContext(ctx, "tcp", target.DialAddr(n))
		if err != nil {
			return err
		}
		defer raw.Close()
		raw.SetDeadline(time.Now().Add(5 * time.Second))
		tc := tls.Client(raw, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
		return tc.Handshake()
	}
	if net.ParseIP(n.HostName) != nil {
		if err := try("some-other-name.example"); err != nil {
			return "", fmt.Errorf("IP hostname: handshake with an unrelated DNS SNI failed: %v", err)
		}
		if err := try(""); err != nil {
			return "", fmt.Errorf("IP hostname: handshake without SNI failed: %v", err)
		}
		return "IP hostname: unrelated SNI and no SNI both accepted", nil
	}
	if err := try(n.HostName); err != nil {
		return "", fmt.Errorf("SNI %q (the hostname) refused: %v", n.HostName, err)
	}
	if err := try("some-other-name.example"); err == nil {
		return "", errors.New("DNS hostname: a different SNI was accepted (Go refuses: cert mismatch with hostname)")
	}
	if err := try(""); err == nil {
		return "", errors.New("DNS hostname: a ClientHello without SNI was accepted (Go refuses)")
	}
	return fmt.Sprintf("DNS hostname %q: matching SNI accepted, other SNI and no SNI refused", n.HostName), nil
}

func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
