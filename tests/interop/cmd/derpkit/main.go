// Command derpkit holds the small helpers the interop runner needs:
//
//	derpkit freeports N            print N free loopback TCP ports whose UDP twin is also free
//	derpkit mkcert DIR HOST        write DIR/ca.pem and DIR/HOST.crt, DIR/HOST.key (leaf signed by the CA)
//	derpkit certname CERT.pem      print sha256-raw:<hex> of the first certificate
//	derpkit derpmap -region N -code C -name NAME -host H [-ipv4 A] [-ipv6 A] -port P -stun-port S [-cert FILE | -insecure]
//	                               print a tailcfg.DERPMap JSON with one region and one node
//	derpkit checkmap FILE CERTNAME check that FILE decodes as a tailcfg.DERPMap whose node pins CERTNAME
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"tailscale.com/tailcfg"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "freeports":
		err = freePorts(os.Args[2:])
	case "mkcert":
		err = mkcert(os.Args[2:])
	case "certname":
		err = certName(os.Args[2:])
	case "derpmap":
		err = derpMap(os.Args[2:])
	case "checkmap":
		err = checkMap(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "derpkit %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: derpkit freeports N | mkcert DIR HOST | certname CERT | derpmap FLAGS | checkmap FILE CERTNAME")
	os.Exit(2)
}

func freePorts(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("want N")
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 || n > 20 {
		return fmt.Errorf("bad N %q", args[0])
	}
	var hold []interface{ Close() error }
	defer func() {
		for _, h := range hold {
			h.Close()
		}
	}()
	for found, tries := 0, 0; found < n; tries++ {
		if tries > 500 {
			return fmt.Errorf("found only %d of %d free TCP+UDP port pairs in 500 tries", found, n)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		hold = append(hold, ln)
		port := ln.Addr().(*net.TCPAddr).Port
		uc, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		hold = append(hold, uc)
		fmt.Println(port)
		found++
	}
	return nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

// mkcert writes a throwaway CA and a leaf for host (DNS name or IP) signed by
// it, valid for 30 days: what derpprobe needs to trust the server through
// SSL_CERT_FILE.
func mkcert(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("want DIR HOST")
	}
	dir, host := args[0], args[1]
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "derp-fleet interop test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(0, 0, 30),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	leafTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(2),
		Subject:               pkix.Name{CommonName: host},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(0, 0, 30),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	if ip := net.ParseIP(host); ip != nil {
		leafTmpl.IPAddresses = []net.IP{ip}
	} else {
		leafTmpl.DNSNames = []string{host}
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(leafKey)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, "ca.pem"), "CERTIFICATE", caDER, 0o644); err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, host+".crt"), "CERTIFICATE", leafDER, 0o644); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, host+".key"), "EC PRIVATE KEY", keyDER, 0o600)
}

func certNameOf(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return "", fmt.Errorf("%s: no CERTIFICATE PEM block", file)
	}
	if _, err := x509.ParseCertificate(blk.Bytes); err != nil {
		return "", err
	}
	sum := sha256.Sum256(blk.Bytes)
	return "sha256-raw:" + hex.EncodeToString(sum[:]), nil
}

func certName(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("want CERT")
	}
	s, err := certNameOf(args[0])
	if err != nil {
		return err
	}
	fmt.Println(s)
	return nil
}

func derpMap(args []string) error {
	fs := flag.NewFlagSet("derpmap", flag.ContinueOnError)
	region := fs.Int("region", 900, "region id")
	code := fs.String("code", "interop", "region code")
	name := fs.String("name", "derp-fleet interop", "region name")
	node := fs.String("node", "", "node name (default <region>a)")
	host := fs.String("host", "127.0.0.1", "HostName")
	ipv4 := fs.String("ipv4", "", "IPv4")
	ipv6 := fs.String("ipv6", "", "IPv6")
	port := fs.Int("port", 0, "DERPPort")
	stunPort := fs.Int("stun-port", 0, "STUNPort (-1 = none)")
	cert := fs.String("cert", "", "pin this certificate file with CertName sha256-raw:")
	insecure := fs.Bool("insecure", false, "set InsecureForTests")
	if err := fs.Parse(args); err != nil {
		return err
	}
	n := &tailcfg.DERPNode{
		Name:             *node,
		RegionID:         *region,
		HostName:         *host,
		IPv4:             *ipv4,
		IPv6:             *ipv6,
		DERPPort:         *port,
		STUNPort:         *stunPort,
		InsecureForTests: *insecure,
	}
	if n.Name == "" {
		n.Name = strconv.Itoa(*region) + "a"
	}
	if *cert != "" {
		cn, err := certNameOf(*cert)
		if err != nil {
			return err
		}
		n.CertName = cn
	}
	dm := &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{
		*region: {RegionID: *region, RegionCode: *code, RegionName: *name, Nodes: []*tailcfg.DERPNode{n}},
	}}
	b, err := json.MarshalIndent(dm, "", "  ")
	if err != nil {
		return err
	}
	fmt.Println(string(b))
	return nil
}

// checkMap validates a map printed by a server (e.g. derper --print-derpmap).
func checkMap(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("want FILE CERTNAME")
	}
	b, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	var dm tailcfg.DERPMap
	if err := json.Unmarshal(b, &dm); err != nil {
		return fmt.Errorf("not a tailcfg.DERPMap: %v", err)
	}
	var found []string
	for id, r := range dm.Regions {
		if r == nil || r.RegionID != id {
			return fmt.Errorf("region key %d does not match its RegionID", id)
		}
		for _, n := range r.Nodes {
			if n.RegionID != id {
				return fmt.Errorf("node %q RegionID %d in region %d", n.Name, n.RegionID, id)
			}
			found = append(found, n.CertName)
			if n.CertName == args[1] {
				fmt.Printf("region %d node %q HostName %q pins %s\n", id, n.Name, n.HostName, n.CertName)
				return nil
			}
		}
	}
	return fmt.Errorf("no node pins %s (CertNames seen: %q)", args[1], found)
}
