package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestExpand(t *testing.T) {
	vars := map[string]string{"IP": "127.0.1.2", "PORT": "443", "EMPTY": ""}
	lookup := func(k string) (string, bool) { v, ok := vars[k]; return v, ok }
	for in, want := range map[string]string{
		"$(IP):$(PORT)":  "127.0.1.2:443",
		"$$(IP)":         "$(IP)",
		"$(MISSING)":     "$(MISSING)",
		"$(EMPTY)x":      "x",
		"a$b":            "a$b",
		"$$":             "$",
		"end$":           "end$",
		"$(IP":           "$(IP",
		"$()":            "$()",
		"$$$(IP)":        "$127.0.1.2",
		"--addr=$(IP)":   "--addr=127.0.1.2",
		"no refs at all": "no refs at all",
	} {
		if got := expand(in, lookup); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRewritePaths(t *testing.T) {
	mounts := []hostMount{{"/etc/derp/tls", "/h/tls"}, {"/etc/derp", "/h/derp"}}
	for in, want := range map[string]string{
		"--certdir=/etc/derp/tls":       "--certdir=/h/tls",
		"/etc/derp/tls/tls.crt":         "/h/tls/tls.crt",
		"/etc/derp/mesh":                "/h/derp/mesh",
		"/etc/derpx":                    "/etc/derpx",
		"/x/etc/derp":                   "/x/etc/derp",
		"a=/etc/derp,b=/etc/derp/tls/k": "a=/h/derp,b=/h/tls/k",
	} {
		if got := rewritePaths(in, mounts); got != want {
			t.Errorf("rewritePaths(%q) = %q, want %q", in, got, want)
		}
	}
	// A host path already written must not be rewritten again by a shorter mount such as /tmp.
	tmp := []hostMount{{"/etc/derp/tls", "/tmp/rig/pod/tls"}, {"/tmp", "/tmp/rig/pod/tmp"}}
	if got, want := rewritePaths("--certdir=/etc/derp/tls --x=/tmp/a", tmp), "--certdir=/tmp/rig/pod/tls --x=/tmp/rig/pod/tmp/a"; got != want {
		t.Errorf("rewritePaths with /tmp = %q, want %q", got, want)
	}
}

func TestAtomicWrite(t *testing.T) {
	dir := t.TempDir()
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "<" + err.Error() + ">"
		}
		return string(b)
	}
	changed, err := atomicWrite(dir, map[string]fileData{"tls.crt": {[]byte("A"), 0o644}, "sub/k": {[]byte("K"), 0o600}})
	if err != nil || !changed {
		t.Fatalf("first write: changed=%v err=%v", changed, err)
	}
	first, _ := os.Readlink(filepath.Join(dir, "..data"))
	if read("tls.crt") != "A" || read("sub/k") != "K" {
		t.Fatalf("contents: %q %q", read("tls.crt"), read("sub/k"))
	}
	if l, _ := os.Readlink(filepath.Join(dir, "tls.crt")); l != "..data/tls.crt" {
		t.Fatalf("tls.crt should link through ..data, got %q", l)
	}
	if changed, _ := atomicWrite(dir, map[string]fileData{"tls.crt": {[]byte("A"), 0o644}, "sub/k": {[]byte("K"), 0o600}}); changed {
		t.Fatal("same payload must not republish")
	}
	if _, err := atomicWrite(dir, map[string]fileData{"tls.crt": {[]byte("B"), 0o644}}); err != nil {
		t.Fatal(err)
	}
	second, _ := os.Readlink(filepath.Join(dir, "..data"))
	if second == first || read("tls.crt") != "B" {
		t.Fatalf("update: ..data %q -> %q, tls.crt=%q", first, second, read("tls.crt"))
	}
	if _, err := os.Lstat(filepath.Join(dir, "sub")); !os.IsNotExist(err) {
		t.Fatal("removed key must disappear")
	}
	if _, err := os.Stat(filepath.Join(dir, first)); !os.IsNotExist(err) {
		t.Fatal("old data dir must be removed")
	}
}

func TestImageRepo(t *testing.T) {
	for in, want := range map[string]string{
		"ghcr.io/x/derper:v1":         "ghcr.io/x/derper",
		"localhost:5000/derper":       "localhost:5000/derper",
		"localhost:5000/derper:1.2":   "localhost:5000/derper",
		"derper@sha256:abcd":          "derper",
		"ghcr.io/x/derper:v1@sha256:": "ghcr.io/x/derper",
	} {
		if got := imageRepo(in); got != want {
			t.Errorf("imageRepo(%q) = %q, want %q", in, got, want)
		}
	}
}
