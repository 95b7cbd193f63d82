package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"tailscale.com/types/key"
)

// cmdCertReload: a client connects with the old pin; the new certificate files
// are moved into place and the server gets SIGHUP. New clients must then see
// the new certificate (the new pin connects, the old pin is refused) while the
// old connection stays up (no receive error, Ping answered, same local port).
func cmdCertReload(args []string) {
	fs := flag.NewFlagSet("certreload", flag.ExitOnError)
	oldMap := fs.String("old-map", "", "map pinning the current certificate")
	newMap := fs.String("new-map", "", "map pinning the new certificate")
	pid := fs.Int("pid", 0, "server process id (gets SIGHUP)")
	srcCrt := fs.String("src-crt", "", "new certificate")
	srcKey := fs.String("src-key", "", "new key")
	dstCrt := fs.String("dst-crt", "", "certificate path the server reads")
	dstKey := fs.String("dst-key", "", "key path the server reads")
	fs.Parse(args)
	ro, rn := loadRegion(*oldMap, 0), loadRegion(*newMap, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	old := regionClient(key.NodePrivate{}, ro, nil)
	fatalIf(old.Connect(ctx), "old client connect")
	cs, _ := old.TLSConnectionState()
	h0 := sha256.Sum256(cs.PeerCertificates[0].Raw)
	la0, _ := old.LocalAddr()
	var recvErr atomic.Value
	go func() {
		for {
			if _, err := old.Recv(); err != nil {
				recvErr.Store(err.Error())
				return
			}
		}
	}()

	for _, mv := range [][2]string{{*srcKey, *dstKey}, {*srcCrt, *dstCrt}} {
		b, err := os.ReadFile(mv[0])
		fatalIf(err, "read new file")
		fatalIf(os.WriteFile(mv[1]+".tmp", b, 0o600), "write")
	}
	fatalIf(os.Rename(*dstKey+".tmp", *dstKey), "rename key")
	fatalIf(os.Rename(*dstCrt+".tmp", *dstCrt), "rename cert")
	t0 := time.Now()
	fatalIf(syscall.Kill(*pid, syscall.SIGHUP), "SIGHUP")

	var took time.Duration
	var h1 [32]byte
	var lastErr error
	for time.Since(t0) < 12*time.Second {
		c := regionClient(key.NodePrivate{}, rn, nil)
		cctx, ccancel := context.WithTimeout(ctx, 3*time.Second)
		err := c.Connect(cctx)
		ccancel()
		if err == nil {
			cs, _ := c.TLSConnectionState()
			h1 = sha256.Sum256(cs.PeerCertificates[0].Raw)
			took = time.Since(t0)
			c.Close()
			break
		}
		lastErr = err
		c.Close()
		time.Sleep(50 * time.Millisecond)
	}
	if !check("sighup/new-cert-served", took > 0 && h1 != h0, "a new client pinned to the new certificate connected %s after SIGHUP (leaf %s..., was %s...)", ms(took), hex.EncodeToString(h1[:6]), hex.EncodeToString(h0[:6])) && lastErr != nil {
		fail("sighup/new-cert-served-error", "%v", lastErr)
	}
	c := regionClient(key.NodePrivate{}, ro, nil)
	cctx, ccancel := context.WithTimeout(ctx, 3*time.Second)
	err := c.Connect(cctx)
	ccancel()
	c.Close()
	check("sighup/old-pin-refused", err != nil, "a new client pinned to the old certificate fails: %v", err)

	pctx, pcancel := context.WithTimeout(ctx, 3*time.Second)
	perr := old.Ping(pctx)
	pcancel()
	la1, _ := old.LocalAddr()
	re, _ := recvErr.Load().(string)
	check("sighup/old-connection-stays", perr == nil && re == "" && la0.String() == la1.String(),
		"connection from %v before SIGHUP: ping after reload err=%v, receive error %q, local address now %v", la0, perr, re, la1)
	old.Close()
}
