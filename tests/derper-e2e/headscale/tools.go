//go:build tools

// Package tools pins Headscale for tests/derper-e2e; built with
// `go build github.com/juanfont/headscale/cmd/headscale`.
package tools

import _ "github.com/juanfont/headscale/cmd/headscale"
