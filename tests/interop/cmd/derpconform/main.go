// Command derpconform checks the wire-level conformance items of
// shared/spec/derp-protocol.md §17 that Tailscale's derphttp client cannot
// express: exact upgrade bytes, the meta certificate, fast start, malformed
// handshakes and frames, rate-limited PeerGone, duplicate keys, and the HTTP
// endpoints. It dials TLS exactly as derphttp does (DialRegionTLS, so
// CertName pinning and InsecureForTests apply) and then writes raw bytes.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"os"
	"time"

	"derp-fleet/tests/interop/internal/check"
	"derp-fleet/tests/interop/internal/target"
)

var (
	tgt     target.Target
	ctx     = context.Background()
	verbose = flag.Bool("v", false, "verbose logging from Tailscale packages")
)

func main() {
	tgt.AddFlags(flag.CommandLine, "", "the server under test")
	run := flag.String("run", "", "only run checks whose name matches this regexp")
	slow := flag.Bool("slow", true, "also run the checks that wait for server timers (10 s handshake deadline, 60-65 s KeepAlive); they run in the background")
	timeout := flag.Duration("timeout", 240*time.Second, "overall time limit")
	flag.Parse()
	if err := tgt.Resolve(); err != nil || tgt.Region == nil {
		fmt.Fprintf(os.Stderr, "derpconform: need -map FILE [-region N]: %v\n", err)
		fmt.Println("0 passed, 1 failed")
		os.Exit(1)
	}
	time.AfterFunc(*timeout, func() {
		fmt.Printf("FAIL derpconform: overall timeout %v exceeded\n0 passed, 1 failed\n", *timeout)
		os.Exit(1)
	})
	fmt.Printf("derpconform: %s\n", tgt.String())
	r := check.New("derpconform/", *run)

	// The timer checks start first and are collected at the end.
	var bg []*background
	if *slow {
		bg = append(bg,
			startBackground(r, "handshake/clientinfo-deadline-10s", checkHandshakeDeadline),
			startBackground(r, "control/keepalive-66s", checkKeepAlive))
	}

	for _, c := range checks {
		r.Run(c.name, c.fn)
	}
	for _, b := range bg {
		b.collect(r)
	}
	r.Finish()
}

type namedCheck struct {
	name string
	fn   func() (string, error)
}

// checks in the order they run; names follow spec §17 groups.
var checks = []namedCheck{
	{"identity/key-file", checkKeyFile},
	{"tls/metacert", checkMetacert},
	{"tls/pinned-sha256-raw", checkPinCorrect},
	{"tls/pinned-wrong-hash-refused", checkPinWrong},
	{"tls/tls12-classic-upgrade", checkTLS12},
	{"tls/tls11-refused", checkTLS11},
	{"tls/sni", checkSNI},
	{"tls/alpn-browser-offer", checkALPNBrowser},
	{"http/derp-without-upgrade-426", checkNoUpgrade},
	{"upgrade/classic-101-exact", checkClassic101},
	{"upgrade/lowercase-derp", checkUpgradeLower},
	{"upgrade/fast-start-0-is-classic", checkFastStartZero},
	{"upgrade/fast-start-no-http-bytes", checkFastStart},
	{"upgrade/fast-start-one-record", checkFastStartOneWrite},
	{"upgrade/websocket-header-without-derp-protocol", checkWebSocketLegacy},
	{"upgrade/websocket-derp", checkWebSocket},
	{"upgrade/websocket-40000-byte-message", checkWebSocketBigMessage},
	{"handshake/serverinfo", checkServerInfo},
	{"handshake/bad-box-closed", checkBadBox},
	{"handshake/meshkey-abc-closed", checkMeshKeyABC},
	{"handshake/MeshKey-pascalcase-abc-closed", checkMeshKeyPascal},
	{"handshake/pascalcase-accepted", checkPascalAccepted},
	{"handshake/wrong-first-frame-closed", checkWrongFirstFrame},
	{"handshake/clientinfo-55-bytes-closed", checkShortClientInfo},
	{"handshake/clientinfo-over-256KiB-closed", checkLongClientInfo},
	{"handshake/zero-client-key-closed", checkZeroKey},
	{"relay/hello-and-bystander", checkHello},
	{"relay/65536-bytes", checkMaxPacket},
	{"relay/65537-bytes-closes", checkOverMaxPacket},
	{"relay/empty-packet", checkEmptyPacket},
	{"relay/to-self", checkSelf},
	{"relay/unknown-dest-non-disco-silent", checkUnknownNonDisco},
	{"relay/unknown-dest-disco-3-of-6-peergone", checkDiscoRateLimit},
	{"relay/peergone-disconnected", checkPeerGoneDisconnected},
	{"relay/sendpacket-31-bytes-closes", checkShortSend},
	{"relay/head-drop-newest-delivered", checkHeadDrop},
	{"relay/stalled-receiver-does-not-block", checkStalledReceiver},
	{"control/ping-8", checkPing8},
	{"control/ping-12-pong-first-8", checkPing12},
	{"control/ping-7-closes", func() (string, error) { return checkPingCloses(7) }},
	{"control/ping-1001-closes", func() (string, error) { return checkPingCloses(1001) }},
	{"control/notepreferred", checkNotePreferred},
	{"control/notepreferred-2-bytes-closes", checkNotePreferred2},
	{"control/unknown-frame-skipped", checkUnknownFrame},
	{"control/server-frame-types-from-client-skipped", checkServerTypesFromClient},
	{"control/watchconns-non-mesh-closes", func() (string, error) { return checkMeshOnly(0x10, nil) }},
	{"control/closepeer-non-mesh-closes", func() (string, error) { return checkMeshOnly(0x11, make([]byte, 32)) }},
	{"control/forwardpacket-non-mesh-closes", func() (string, error) { return checkMeshOnly(0x0a, make([]byte, 64+10)) }},
	{"dup/last-writer-wins", checkDupLastWriter},
	{"dup/close-active-falls-back", checkDupCloseActive},
	{"http/derp-probe", func() (string, error) { return checkProbe("/derp/probe") }},
	{"http/derp-latency-check", func() (string, error) { return checkProbe("/derp/latency-check") }},
	{"http/generate_204", checkGenerate204},
	{"http/robots.txt", checkRobots},
	{"http/bootstrap-dns", checkBootstrapDNS},
	{"http/home", checkHome},
	{"http/port80-listener", checkPort80},
}

// background runs a slow check concurrently with the others.
type background struct {
	name   string
	done   chan struct{}
	detail string
	err    error
}

func startBackground(r *check.Report, name string, fn func() (string, error)) *background {
	b := &background{name: name, done: make(chan struct{})}
	if r.Filter != nil && !r.Filter.MatchString(name) {
		close(b.done)
		b.err = errFiltered
		return b
	}
	go func() {
		defer close(b.done)
		defer func() {
			if p := recover(); p != nil {
				b.err = fmt.Errorf("panic: %v", p)
			}
		}()
		b.detail, b.err = fn()
	}()
	return b
}

var errFiltered = fmt.Errorf("filtered")

func (b *background) collect(r *check.Report) {
	<-b.done
	if b.err == errFiltered {
		return
	}
	r.Run(b.name, func() (string, error) { return b.detail, b.err })
}

// tls12 caps the TLS version at 1.2.
var tls12 = &tls.Config{MaxVersion: tls.VersionTLS12}
