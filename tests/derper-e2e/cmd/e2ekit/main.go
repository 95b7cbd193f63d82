// Command e2ekit holds the Go checks of tests/derper-e2e that derprelay cannot
// express. Every subcommand prints one "PASS|FAIL <name>: <measured>" line per
// check (the runner counts them) and exits non-zero if any check failed.
//
//	e2ekit pair       two derphttp clients relaying a continuous, checked stream both ways
//	e2ekit failover   clients of a two-node region through SIGTERM of node 1 (gap per client)
//	e2ekit certreload SIGHUP with a new certificate: old connection stays, new ones see it
//	e2ekit flood      thousands of handshakes, good and bad, as fast as the server takes them
//	e2ekit slowloris  connections that dribble their TLS record or request head
//	e2ekit admit      one derphttp client with a given (or random) node key: admitted or refused
//	e2ekit nodekey    the node private key in a tailscaled state file
//	e2ekit serverkey  the public key of a derper -c key file
//	e2ekit hold       many clients relaying in pairs while the server changes under them (no drops)
//	e2ekit certinfo   the certificate a server presents to a Go TLS client
//	e2ekit rate       the rate one client's packets reach another (-rate-config)
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

var (
	resMu          sync.Mutex
	passed, failed int
)

func pass(name, format string, args ...any) {
	resMu.Lock()
	defer resMu.Unlock()
	passed++
	fmt.Printf("PASS %s: %s\n", name, fmt.Sprintf(format, args...))
}

func fail(name, format string, args ...any) {
	resMu.Lock()
	defer resMu.Unlock()
	failed++
	fmt.Printf("FAIL %s: %s\n", name, fmt.Sprintf(format, args...))
}

func check(name string, ok bool, format string, args ...any) bool {
	if ok {
		pass(name, format, args...)
	} else {
		fail(name, format, args...)
	}
	return ok
}

func finish() {
	resMu.Lock()
	defer resMu.Unlock()
	if failed > 0 {
		os.Exit(1)
	}
	os.Exit(0)
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "e2ekit: "+format+"\n", args...)
	fmt.Printf("FAIL e2ekit: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fatalf("usage: e2ekit pair|failover|certreload|flood|slowloris|admit|nodekey|serverkey|hold|certinfo|rate FLAGS")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "pair":
		cmdPair(args)
	case "failover":
		cmdFailover(args)
	case "certreload":
		cmdCertReload(args)
	case "flood":
		cmdFlood(args)
	case "slowloris":
		cmdSlowloris(args)
	case "admit":
		cmdAdmit(args)
	case "nodekey":
		cmdNodeKey(args)
	case "serverkey":
		cmdServerKey(args)
	case "hold":
		cmdHold(args)
	case "certinfo":
		cmdCertInfo(args)
	case "rate":
		cmdRate(args)
	default:
		fatalf("unknown subcommand %q", os.Args[1])
	}
	finish()
}

// loadRegion reads a tailcfg.DERPMap JSON file and returns its only region
// (or region id).
func loadRegion(file string, id int) *tailcfg.DERPRegion {
	b, err := os.ReadFile(file)
	if err != nil {
		fatalf("%v", err)
	}
	var dm tailcfg.DERPMap
	if err := json.Unmarshal(b, &dm); err != nil {
		fatalf("%s: %v", file, err)
	}
	if id == 0 && len(dm.Regions) == 1 {
		for _, r := range dm.Regions {
			return r
		}
	}
	r := dm.Regions[id]
	if r == nil || len(r.Nodes) == 0 {
		fatalf("%s: no region %d with nodes", file, id)
	}
	return r
}

// regionClient is what tailscaled uses: NewRegionClient dials the region's
// nodes in map order and honours HostName, IPv4, DERPPort and CertName.
func regionClient(priv key.NodePrivate, reg *tailcfg.DERPRegion, logf logger.Logf) *derphttp.Client {
	if priv.IsZero() {
		priv = key.NewNode()
	}
	if logf == nil {
		logf = logger.Discard
	}
	return derphttp.NewRegionClient(priv, logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return reg })
}

// readServerKey returns the public key of a Go-format derper key file
// ({"PrivateKey":"privkey:..."}).
func readServerKey(file string) key.NodePublic {
	b, err := os.ReadFile(file)
	if err != nil {
		fatalf("%v", err)
	}
	var cfg struct{ PrivateKey key.NodePrivate }
	if err := json.Unmarshal(b, &cfg); err != nil {
		fatalf("%s: %v", file, err)
	}
	return cfg.PrivateKey.Public()
}

// readNodePrivate reads "privkey:<hex>" from a file.
func readNodePrivate(file string) key.NodePrivate {
	b, err := os.ReadFile(file)
	if err != nil {
		fatalf("%v", err)
	}
	var k key.NodePrivate
	if err := k.UnmarshalText([]byte(strings.TrimSpace(string(b)))); err != nil {
		fatalf("%s: %v", file, err)
	}
	return k
}

// recvUntilError drains a client (derphttp delivers pongs inside Recv).
func recvUntilError(c *derphttp.Client) {
	for {
		if _, err := c.Recv(); err != nil {
			return
		}
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }
