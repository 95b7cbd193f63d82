// Package target turns command-line flags (a DERP map file and region id, or a
// plain URL) into Tailscale derphttp clients and TLS connections made exactly
// the way tailscaled makes them.
package target

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// Target is one DERP server to talk to: either a region of a DERP map
// (honouring HostName, IPv4, DERPPort, CertName and InsecureForTests as
// tailscaled does) or a URL (derphttp.NewClient, standard verification plus
// optional extra roots).
type Target struct {
	MapFile  string
	RegionID int
	URL      string
	CAFile   string // extra trusted roots for URL mode (PEM)

	Region *tailcfg.DERPRegion // loaded by Resolve in map mode
	roots  *x509.CertPool
}

// AddFlags registers -<prefix>map, -<prefix>region, -<prefix>url and
// -<prefix>ca-file on fs.
func (t *Target) AddFlags(fs *flag.FlagSet, prefix, what string) {
	fs.StringVar(&t.MapFile, prefix+"map", "", "DERP map JSON file (tailcfg.DERPMap) for "+what)
	fs.IntVar(&t.RegionID, prefix+"region", 0, "region id in -"+prefix+"map (0 = the only region)")
	fs.StringVar(&t.URL, prefix+"url", "", "alternatively a DERP URL (https://host:port/derp) for "+what)
	fs.StringVar(&t.CAFile, prefix+"ca-file", "", "PEM roots trusted in addition to the system ones (URL mode)")
}

// Set reports whether any of the target's flags were given.
func (t *Target) Set() bool { return t.MapFile != "" || t.URL != "" }

// Resolve loads the map or checks the URL.
func (t *Target) Resolve() error {
	if (t.MapFile == "") == (t.URL == "") {
		return errors.New("give exactly one of a DERP map file (with a region) or a URL")
	}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return err
		}
		t.roots = x509.NewCertPool()
		if !t.roots.AppendCertsFromPEM(pem) {
			return fmt.Errorf("%s: no PEM certificates", t.CAFile)
		}
	}
	if t.URL != "" {
		if _, err := url.Parse(t.URL); err != nil {
			return err
		}
		return nil
	}
	reg, err := LoadRegion(t.MapFile, t.RegionID)
	if err != nil {
		return err
	}
	t.Region = reg
	return nil
}

// LoadRegion reads a tailcfg.DERPMap JSON file and returns region id (or the
// only region if id is 0).
func LoadRegion(file string, id int) (*tailcfg.DERPRegion, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var dm tailcfg.DERPMap
	if err := json.Unmarshal(b, &dm); err != nil {
		return nil, fmt.Errorf("%s: not a tailcfg.DERPMap: %v", file, err)
	}
	if id == 0 {
		if len(dm.Regions) != 1 {
			return nil, fmt.Errorf("%s has %d regions; pass a region id", file, len(dm.Regions))
		}
		for _, r := range dm.Regions {
			return r, nil
		}
	}
	r := dm.Regions[id]
	if r == nil {
		return nil, fmt.Errorf("%s has no region %d", file, id)
	}
	if len(r.Nodes) == 0 {
		return nil, fmt.Errorf("%s region %d has no nodes", file, id)
	}
	return r, nil
}

// String names the target for messages.
func (t *Target) String() string {
	if t.URL != "" {
		return t.URL
	}
	n := t.Region.Nodes[0]
	return fmt.Sprintf("region %d node %s (%s:%d)", t.Region.RegionID, n.Name, n.HostName, n.DERPPort)
}

// Logf returns a logger for Tailscale's packages: silent unless verbose.
func Logf(verbose bool, tag string) logger.Logf {
	if !verbose {
		return logger.Discard
	}
	return func(format string, args ...any) { log.Printf(tag+": "+format, args...) }
}

// NewClient returns a derphttp client for the target with a fresh node key
// (or priv, if non-zero).
func (t *Target) NewClient(priv key.NodePrivate, logf logger.Logf) (*derphttp.Client, error) {
	if priv.IsZero() {
		priv = key.NewNode()
	}
	nm := netmon.NewStatic()
	if t.URL != "" {
		c, err := derphttp.NewClient(priv, t.URL, logf, nm)
		if err != nil {
			return nil, err
		}
		if t.roots != nil {
			c.TLSConfig = &tls.Config{RootCAs: t.roots}
		}
		return c, nil
	}
	reg := t.Region
	return derphttp.NewRegionClient(priv, logf, nm, func() *tailcfg.DERPRegion { return reg }), nil
}

// DialTLS opens a TCP+TLS connection to the target's first reachable node
// using derphttp's own dialing and TLS verification (DialRegionTLS), with
// base (may be nil) as the starting TLS config, e.g. to cap the version.
func (t *Target) DialTLS(ctx context.Context, base *tls.Config, logf logger.Logf) (*tls.Conn, *tailcfg.DERPNode, error) {
	if t.Region == nil {
		return nil, nil, errors.New("raw TLS dialing needs a DERP map target")
	}
	c := derphttp.NewNetcheckClient(logf, netmon.NewStatic())
	c.TLSConfig = base
	tc, _, node, err := c.DialRegionTLS(ctx, t.Region)
	return tc, node, err
}

// Node returns the target's first node (map mode).
func (t *Target) Node() *tailcfg.DERPNode { return t.Region.Nodes[0] }

// DialAddr returns host:port that a client dials for node n (IPv4 literal if
// set, else HostName; DERPPort or 443).
func DialAddr(n *tailcfg.DERPNode) string {
	host := n.HostName
	if ip := net.ParseIP(n.IPv4); ip != nil {
		host = n.IPv4
	}
	port := n.DERPPort
	if port == 0 {
		port = 443
	}
	return net.JoinHostPort(host, strconv.Itoa(port))
}

// HostHeader is what Go's derphttp puts in the Host header for node n.
func HostHeader(n *tailcfg.DERPNode) string {
	if n.DERPPort == 0 || n.DERPPort == 443 {
		return n.HostName
	}
	h := n.HostName
	if strings.Contains(h, ":") {
		h = "[" + h + "]"
	}
	return h + ":" + strconv.Itoa(n.DERPPort)
}
