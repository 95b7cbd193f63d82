package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	"derp-fleet/tests/interop/internal/check"

	"tailscale.com/types/key"
)

var keyFile = flag.String("key-file", "", "the server's -c key file: check its Go JSON format, mode 0600, and that the server presents its public key")

// checkKeyFile: spec §2.2. The -c file must be Go's JSON so an existing Go
// derper's key keeps its identity when swapped for ours, and vice versa.
func checkKeyFile() (string, error) {
	if *keyFile == "" {
		return "", check.Skip("no -key-file given")
	}
	st, err := os.Stat(*keyFile)
	if err != nil {
		return "", err
	}
	if m := st.Mode().Perm(); m != 0o600 {
		return "", fmt.Errorf("%s has mode %o, want 600", *keyFile, m)
	}
	b, err := os.ReadFile(*keyFile)
	if err != nil {
		return "", err
	}
	var cfg struct{ PrivateKey key.NodePrivate }
	if err := json.Unmarshal(b, &cfg); err != nil {
		return "", fmt.Errorf("%s is not Go derper JSON {\"PrivateKey\":\"privkey:…\"}: %v", *keyFile, err)
	}
	if cfg.PrivateKey.IsZero() || !strings.Contains(string(b), `"PrivateKey": "privkey:`) && !strings.Contains(string(b), `"PrivateKey":"privkey:`) {
		return "", fmt.Errorf("%s has no PrivateKey privkey:… value: %q", *keyFile, b)
	}
	c, err := upgraded()
	if err != nil {
		return "", err
	}
	defer c.Close()
	if c.ServerKey != cfg.PrivateKey.Public() {
		return "", fmt.Errorf("server presents key %s, the key file's public key is %s", c.ServerKey.ShortString(), cfg.PrivateKey.Public().ShortString())
	}
	return fmt.Sprintf("mode 600, Go JSON, server key %s = key file", c.ServerKey.ShortString()), nil
}
