package main

import (
	"encoding/binary"
	"fmt"
	"strings"
	"time"

	"derp-fleet/tests/interop/internal/rawderp"

	"tailscale.com/types/key"
)

// upgraded returns a connection after the classic upgrade (ServerKey read).
func upgraded() (*rawderp.Conn, error) {
	c, err := rawderp.Dial(ctx, &tgt, nil)
	if err != nil {
		return nil, err
	}
	if err := c.Upgrade(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// connected returns a logged-in raw client.
func connected() (*rawderp.Conn, error) { return rawderp.Connect(ctx, &tgt, key.NodePrivate{}) }

// checkServerInfo: §6, §17 items 11, 12.
func checkServerInfo() (string, error) {
	c, err := upgraded()
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.Priv = key.NewNode()
	if err := c.WriteFrame(rawderp.ClientInfo, rawderp.ClientInfoPayload(c.Priv, c.ServerKey, rawderp.DefaultInfo)); err != nil {
		return "", err
	}
	msg, err := c.ReadServerInfo(5 * time.Second)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("ServerKey then ServerInfo %s", msg), nil
}

// rejected sends payload as frame type t instead of a valid ClientInfo and
// expects the server to close without a ServerInfo.
func rejected(t byte, payload []byte, what string) (string, error) {
	c, err := upgraded()
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.WriteFrame(t, payload); err != nil {
		return "", err
	}
	types, err := c.ExpectClosed(12 * time.Second)
	if err != nil {
		return "", fmt.Errorf("%s: %v", what, err)
	}
	for _, ty := range types {
		if ty == rawderp.ServerInfo {
			return "", fmt.Errorf("%s: server sent ServerInfo before closing", what)
		}
	}
	return what + ": closed without ServerInfo", nil
}

// checkBadBox: §17 item 13.
func checkBadBox() (string, error) {
	c, err := upgraded()
	if err != nil {
		return "", err
	}
	c.Close()
	priv := key.NewNode()
	p := rawderp.ClientInfoPayload(priv, c.ServerKey, rawderp.DefaultInfo)
	p[len(p)-1] ^= 0x55 // corrupt the ciphertext
	return rejected(rawderp.ClientInfo, p, "ClientInfo box that does not open")
}

// sealedInfo returns a ClientInfo payload for json sealed to the server key.
func sealedInfo(json string) ([]byte, error) {
	c, err := upgraded()
	if err != nil {
		return nil, err
	}
	c.Close()
	return rawderp.ClientInfoPayload(key.NewNode(), c.ServerKey, []byte(json)), nil
}

func rejectJSON(json string) (string, error) {
	p, err := sealedInfo(json)
	if err != nil {
		return "", err
	}
	return rejected(rawderp.ClientInfo, p, "ClientInfo "+json)
}

// checkMeshKeyABC: §6.2, §17 item 14.
func checkMeshKeyABC() (string, error) {
	return rejectJSON(`{"meshKey":"abc","version":2,"CanAckPings":false}`)
}

// checkMeshKeyPascal: §17 item 17: JSON keys are case-insensitive, so a bad
// "MeshKey" must be rejected just like "meshKey".
func checkMeshKeyPascal() (string, error) {
	return rejectJSON(`{"MeshKey":"abc","Version":2}`)
}

// checkPascalAccepted: §17 item 17.
func checkPascalAccepted() (string, error) {
	c, err := upgraded()
	if err != nil {
		return "", err
	}
	defer c.Close()
	zero := strings.Repeat("0", 64) // all-zero mesh key = no mesh key (§6.2)
	info := `{"MeshKey":"` + zero + `","Version":2,"canackpings":true,"SomethingNew":[1,2]}`
	if err := c.Login([]byte(info)); err != nil {
		return "", fmt.Errorf("ClientInfo %s: %v", info, err)
	}
	if err := c.PingPong(3 * time.Second); err != nil {
		return "", err
	}
	// A regular client: WatchConns must close it (the zero key grants nothing).
	if err := c.WriteFrame(rawderp.WatchConns, nil); err != nil {
		return "", err
	}
	if _, err := c.ExpectClosed(5 * time.Second); err != nil {
		return "", fmt.Errorf("zero MeshKey granted mesh rights: WatchConns: %v", err)
	}
	return "PascalCase keys, all-zero MeshKey and unknown keys accepted as a regular client", nil
}

// checkWrongFirstFrame: §17 item 15 (type ≠ 0x02).
func checkWrongFirstFrame() (string, error) {
	p, err := sealedInfo(string(rawderp.DefaultInfo))
	if err != nil {
		return "", err
	}
	return rejected(rawderp.SendPacket, p, "valid ClientInfo payload sent as frame type 0x04")
}

// checkShortClientInfo: §17 item 15 (length < 56).
func checkShortClientInfo() (string, error) {
	p := key.NewNode().Public().AppendTo(nil)
	p = append(p, make([]byte, 23)...) // 55 bytes
	return rejected(rawderp.ClientInfo, p, "55-byte ClientInfo")
}

// checkLongClientInfo: §17 item 15 (length > 262 144).
func checkLongClientInfo() (string, error) {
	c, err := upgraded()
	if err != nil {
		return "", err
	}
	defer c.Close()
	h := make([]byte, 5)
	h[0] = rawderp.ClientInfo
	binary.BigEndian.PutUint32(h[1:], 256<<10+1)
	if err := c.Write(append(h, make([]byte, 1024)...)); err != nil {
		return "", err
	}
	types, err := c.ExpectClosed(12 * time.Second)
	if err != nil {
		return "", fmt.Errorf("ClientInfo header claiming 262145 bytes: %v", err)
	}
	if len(types) > 0 {
		return "", fmt.Errorf("frames before close: %s", rawderp.TypeNames(types))
	}
	return "header claiming 262145 bytes: closed without reading the body, no ServerInfo", nil
}

// checkZeroKey: §2.3, §17 item 15 (all-zero client key).
func checkZeroKey() (string, error) {
	p, err := sealedInfo(string(rawderp.DefaultInfo))
	if err != nil {
		return "", err
	}
	copy(p[:32], make([]byte, 32))
	return rejected(rawderp.ClientInfo, p, "ClientInfo with an all-zero client key")
}

// checkHandshakeDeadline: §6, §17 item 16 (runs in the background).
func checkHandshakeDeadline() (string, error) {
	c, err := upgraded()
	if err != nil {
		return "", err
	}
	defer c.Close()
	t0 := time.Now()
	types, err := c.ExpectClosed(20 * time.Second)
	d := time.Since(t0)
	if err != nil {
		return "", fmt.Errorf("no ClientInfo sent: %v", err)
	}
	if d < 8*time.Second || d > 13*time.Second {
		return "", fmt.Errorf("closed after %v, want about 10 s", d.Round(time.Millisecond))
	}
	return fmt.Sprintf("silent client closed after %v (frames: %s)", d.Round(time.Millisecond), rawderp.TypeNames(types)), nil
}
