package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"tailscale.com/types/key"
)

// cmdAdmit: one derphttp client (NewRegionClient on -map) with the node key in
// -key-file (or a random one) connects and pings. Admitted means the
// handshake completed and a Ping was answered.
func cmdAdmit(args []string) {
	fs := flag.NewFlagSet("admit", flag.ExitOnError)
	name := fs.String("name", "admit", "check name")
	mapFile := fs.String("map", "", "DERP map")
	keyFile := fs.String("key-file", "", "privkey:<hex> file (default: a random key)")
	expect := fs.String("expect", "admit", "admit or refuse")
	what := fs.String("what", "", "description of the key")
	fs.Parse(args)
	reg := loadRegion(*mapFile, 0)
	priv := key.NewNode()
	if *keyFile != "" {
		priv = readNodePrivate(*keyFile)
	}
	if *what == "" {
		*what = "random key"
	}
	c := regionClient(priv, reg, nil)
	defer c.Close()
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	err := c.Connect(ctx)
	if err == nil {
		// Ping's pong is delivered by Recv; a refused client sees the close there first.
		recvErr := make(chan error, 1)
		go func() {
			for {
				if _, err := c.Recv(); err != nil {
					recvErr <- fmt.Errorf("closed by the server: %v", err)
					return
				}
			}
		}()
		pctx, pcancel := context.WithTimeout(ctx, 4*time.Second)
		pingErr := make(chan error, 1)
		go func() { pingErr <- c.Ping(pctx) }()
		select {
		case err = <-pingErr:
		case err = <-recvErr:
		}
		pcancel()
	}
	admitted := err == nil
	detail := fmt.Sprintf("%s %s: ", *what, priv.Public().ShortString())
	if admitted {
		detail += fmt.Sprintf("admitted (handshake + ping in %s)", ms(time.Since(t0)))
	} else {
		detail += fmt.Sprintf("refused after %s (%v)", ms(time.Since(t0)), err)
	}
	check(*name, admitted == (*expect == "admit"), "%s, expected %s", detail, *expect)
}

// cmdNodeKey: the node private key in a tailscaled state file (a JSON object
// of base64 values; the profile's prefs hold Config.PrivateNodeKey). Writes
// privkey:<hex> to -out and prints the public nodekey.
func cmdNodeKey(args []string) {
	fs := flag.NewFlagSet("nodekey", flag.ExitOnError)
	state := fs.String("state", "", "tailscaled.state")
	out := fs.String("out", "", "where to write privkey:<hex>")
	fs.Parse(args)
	b, err := os.ReadFile(*state)
	fatalIf(err, "read state")
	var m map[string]string
	fatalIf(json.Unmarshal(b, &m), "state JSON")
	for k, v := range m {
		raw, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			continue
		}
		var prefs struct {
			Config *struct{ PrivateNodeKey key.NodePrivate }
		}
		if json.Unmarshal(raw, &prefs) != nil || prefs.Config == nil || prefs.Config.PrivateNodeKey.IsZero() {
			continue
		}
		txt, _ := prefs.Config.PrivateNodeKey.MarshalText()
		fatalIf(os.WriteFile(*out, append(txt, '\n'), 0o600), "write key")
		fmt.Printf("%s %s\n", prefs.Config.PrivateNodeKey.Public().String(), k)
		os.Exit(0)
	}
	fatalf("no PrivateNodeKey in %s", *state)
}

func cmdServerKey(args []string) {
	if len(args) != 1 {
		fatalf("serverkey FILE")
	}
	fmt.Println(readServerKey(args[0]).String())
	os.Exit(0)
}
