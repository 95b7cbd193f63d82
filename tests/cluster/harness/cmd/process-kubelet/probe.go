package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/klog/v2"
)

func resolvePort(c *corev1.Container, p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("no container port named %q", p.StrVal)
}

// probeOnce runs one probe attempt against the pod's IP (the node's 127.x address).
func (w *podWorker) probeOnce(ctx context.Context, c *corev1.Container, pr *corev1.Probe) error {
	timeout := time.Duration(max(pr.TimeoutSeconds, 1)) * time.Second
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	host := w.node.ip
	switch {
	case pr.HTTPGet != nil:
		h := pr.HTTPGet
		if h.Host != "" {
			host = h.Host
		}
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			return fmt.Errorf("probe host %q is not a loopback address; refusing to dial", host)
		}
		port, err := resolvePort(c, h.Port)
		if err != nil {
			return err
		}
		scheme := "http"
		if h.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		path := h.Path
		if path == "" || path[0] != '/' {
			path = "/" + path
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), path), nil)
		if err != nil {
			return err
		}
		for _, hh := range h.HTTPHeaders {
			if hh.Name == "Host" {
				req.Host = hh.Value
			} else {
				req.Header.Add(hh.Name, hh.Value)
			}
		}
		req.Header.Set("User-Agent", "kube-probe/process-kubelet")
		cl := &http.Client{Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, // as kubelet: probes do not verify
			DisableKeepAlives: true,
		}, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		resp, err := cl.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP probe failed with statuscode: %d", resp.StatusCode)
		}
		return nil
	case pr.TCPSocket != nil:
		if pr.TCPSocket.Host != "" {
			host = pr.TCPSocket.Host
		}
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			return fmt.Errorf("probe host %q is not a loopback address; refusing to dial", host)
		}
		port, err := resolvePort(c, pr.TCPSocket.Port)
		if err != nil {
			return err
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case pr.Exec != nil:
		p := w.current()
		argv, env, dir, err := w.command(p, &corev1.Container{
			Image: c.Image, Command: pr.Exec.Command, Env: c.Env, EnvFrom: c.EnvFrom, VolumeMounts: c.VolumeMounts, WorkingDir: c.WorkingDir,
		})
		if err != nil {
			return err
		}
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		cmd.Env, cmd.Dir = env, dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("exec probe: %v: %s", err, out)
		}
		return nil
	}
	return fmt.Errorf("unsupported probe handler (grpc is not implemented)")
}

// probeLoop drives readiness and liveness for one container, as kubelet's prober does.
func (w *podWorker) probeLoop(ctx context.Context, c *corev1.Container) {
	type state struct {
		probe          *corev1.Probe
		succ, fail     int32
		nextAt         time.Time
		liveness       bool
		lastLoggedFail string
	}
	var probes []*state
	now := time.Now()
	if c.ReadinessProbe != nil {
		probes = append(probes, &state{probe: c.ReadinessProbe, nextAt: now.Add(time.Duration(c.ReadinessProbe.InitialDelaySeconds) * time.Second)})
	}
	if c.LivenessProbe != nil {
		probes = append(probes, &state{probe: c.LivenessProbe, liveness: true, nextAt: now.Add(time.Duration(c.LivenessProbe.InitialDelaySeconds) * time.Second)})
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	var lastPid int
	for {
		select {
		case <-w.stopCh:
			return
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		w.mu.Lock()
		r := w.runs[c.Name]
		running, pid := r.running, r.pid
		w.mu.Unlock()
		if !running {
			continue
		}
		if pid != lastPid { // a new process: probes start over
			lastPid = pid
			for _, s := range probes {
				s.succ, s.fail = 0, 0
				s.nextAt = time.Now().Add(time.Duration(s.probe.InitialDelaySeconds) * time.Second)
			}
			if c.ReadinessProbe == nil {
				w.setReady(c.Name, pid, true)
			}
		}
		for _, s := range probes {
			if time.Now().Before(s.nextAt) {
				continue
			}
			s.nextAt = time.Now().Add(time.Duration(max(s.probe.PeriodSeconds, 1)) * time.Second)
			err := w.probeOnce(ctx, c, s.probe)
			if err == nil {
				s.succ++
				s.fail = 0
			} else {
				s.fail++
				s.succ = 0
				if msg := err.Error(); msg != s.lastLoggedFail {
					klog.V(1).Infof("pod %s/%s[%s]: probe failed: %v", w.namespace, w.name, c.Name, err)
					s.lastLoggedFail = msg
				}
			}
			succT, failT := max(s.probe.SuccessThreshold, 1), max(s.probe.FailureThreshold, 1)
			if s.liveness {
				if s.fail >= failT {
					s.fail = 0
					select {
					case r.livenessKill <- struct{}{}:
					default:
					}
				}
				continue
			}
			if s.succ >= succT {
				w.setReady(c.Name, pid, true)
			} else if s.fail >= failT {
				w.setReady(c.Name, pid, false)
			}
		}
	}
}

func (w *podWorker) setReady(name string, pid int, ready bool) {
	w.mu.Lock()
	r := w.runs[name]
	changed := r.pid == pid && r.running && r.ready != ready
	if changed {
		r.ready = ready
	}
	w.mu.Unlock()
	if changed {
		w.markDirty()
	}
}
