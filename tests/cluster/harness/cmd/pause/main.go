// Command pause is the sandbox ("pause") container of the real-kubelet rig: containerd starts it
// as the first process of every pod sandbox, where it holds the pod's namespaces until the
// sandbox is stopped. Registries are unreachable here, so the rig builds this static binary and
// imports it as containerd's sandbox_image instead of pulling registry.k8s.io/pause.
//
// Like upstream's pause it exits 0 on SIGINT/SIGTERM. Orphans reparented to it (shared PID
// namespaces) are reaped on SIGCHLD.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		// Reap every exited child (there may be several per signal); never block.
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
