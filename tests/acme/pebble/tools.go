//go:build tools

// Package tools pins Pebble (Let's Encrypt's ACME test server) and its
// challenge test server for tests/acme; built with
// `go build github.com/letsencrypt/pebble/v2/cmd/pebble ...`.
package tools

import (
	_ "github.com/letsencrypt/pebble/v2/cmd/pebble"
	_ "github.com/letsencrypt/pebble/v2/cmd/pebble-challtestsrv"
)
