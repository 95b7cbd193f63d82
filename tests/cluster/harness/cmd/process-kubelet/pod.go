package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

type hostMount struct{ mountPath, hostPath string }

// containerRun is the live state of one container's process.
type containerRun struct {
	name         string
	image        string
	pid          int
	running      bool
	started      bool
	ready        bool
	restarts     int32
	startedAt    metav1.Time
	waitReason   string
	waitMessage  string
	lastTerm     *corev1.ContainerStateTerminated
	term         *corev1.ContainerStateTerminated // current state when terminated for good
	livenessKill chan struct{}
}

type podWorker struct {
	k         *kubelet
	node      *ownedNode
	namespace string
	name      string
	uid       types.UID
	dir       string
	logBase   string

	mu      sync.Mutex
	pod     *corev1.Pod
	runs    map[string]*containerRun
	initOK  bool
	updates chan struct{}
	dirty   chan struct{}

	vmu     sync.Mutex
	volDirs map[string]string
	volDeps map[string]map[string]bool
	tokens  map[string]cachedToken

	stopOnce  sync.Once
	stopCh    chan struct{} // closed when the pod must stop
	stopGrace time.Duration
	deleteObj bool // delete the pod object once stopped (graceful deletion)
	procWG    sync.WaitGroup
	lastErr   error
}

func newPodWorker(k *kubelet, p *corev1.Pod, n *ownedNode) *podWorker {
	base := fmt.Sprintf("%s_%s_%s", p.Namespace, p.Name, string(p.UID)[:8])
	return &podWorker{
		k: k, node: n, namespace: p.Namespace, name: p.Name, uid: p.UID,
		dir: filepath.Join(k.stateDir, "pods", base), logBase: p.Namespace + "_" + p.Name,
		pod: p.DeepCopy(), runs: map[string]*containerRun{},
		updates: make(chan struct{}, 1), dirty: make(chan struct{}, 1),
		volDirs: map[string]string{}, volDeps: map[string]map[string]bool{}, tokens: map[string]cachedToken{},
		stopCh: make(chan struct{}),
	}
}

func (w *podWorker) current() *corev1.Pod {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pod
}

func (w *podWorker) update(p *corev1.Pod) {
	w.mu.Lock()
	w.pod = p.DeepCopy()
	w.mu.Unlock()
	if p.DeletionTimestamp != nil {
		grace := time.Duration(ptr.Deref(p.DeletionGracePeriodSeconds, ptr.Deref(p.Spec.TerminationGracePeriodSeconds, 30))) * time.Second
		w.stop(grace, true)
	}
}

func (w *podWorker) stop(grace time.Duration, deleteObj bool) {
	w.stopOnce.Do(func() {
		w.stopGrace, w.deleteObj = grace, deleteObj
		close(w.stopCh)
	})
}

// forceGone: the object is already gone from the API server.
func (w *podWorker) forceGone() { w.stop(2*time.Second, false) }

// shutdown: process-kubelet is exiting; leave the object as it is.
func (w *podWorker) shutdown() { w.stop(5*time.Second, false) }

func (w *podWorker) stopping() bool {
	select {
	case <-w.stopCh:
		return true
	default:
		return false
	}
}

func (w *podWorker) markDirty() {
	select {
	case w.dirty <- struct{}{}:
	default:
	}
}

func (w *podWorker) objectChanged(kind, name string) {
	key := kind + "/" + name
	w.vmu.Lock()
	hit := false
	for _, deps := range w.volDeps {
		if deps[key] {
			hit = true
		}
	}
	w.vmu.Unlock()
	if !hit || w.stopping() {
		return
	}
	w.vmu.Lock()
	err := w.syncVolumes(context.TODO(), w.current(), map[string]bool{key: true})
	w.vmu.Unlock()
	if err != nil {
		klog.Warningf("pod %s/%s: refreshing volumes after %s changed: %v (keeping old contents)", w.namespace, w.name, key, err)
	} else {
		klog.V(2).Infof("pod %s/%s: volumes refreshed after %s changed", w.namespace, w.name, key)
	}
}

func (w *podWorker) run(ctx context.Context) {
	p := w.current()
	klog.Infof("pod %s/%s: starting on node %s (%s)", w.namespace, w.name, w.node.name, w.node.ip)
	go w.statusLoop(ctx)
	for _, c := range append(append([]corev1.Container{}, p.Spec.InitContainers...), p.Spec.Containers...) {
		w.runs[c.Name] = &containerRun{name: c.Name, image: c.Image, waitReason: "ContainerCreating", livenessKill: make(chan struct{}, 1)}
	}
	w.markDirty()

	// Volumes first, retried until present (a kubelet waits in ContainerCreating too).
	for attempt := 0; ; attempt++ {
		w.vmu.Lock()
		err := w.syncVolumes(ctx, w.current(), nil)
		w.vmu.Unlock()
		if err == nil {
			break
		}
		w.setWaiting("", "ContainerCreating", err.Error())
		if attempt%10 == 0 {
			klog.Warningf("pod %s/%s: volumes not ready: %v", w.namespace, w.name, err)
		}
		select {
		case <-w.stopCh:
			w.finish(ctx)
			return
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
	go w.tokenRefreshLoop(ctx)

	// Init containers, in order, each to successful completion.
	for i := range p.Spec.InitContainers {
		c := p.Spec.InitContainers[i]
		if !w.runInit(ctx, &c) {
			w.finish(ctx)
			return
		}
	}
	w.mu.Lock()
	w.initOK = true
	w.mu.Unlock()
	for i := range p.Spec.Containers {
		c := p.Spec.Containers[i]
		w.procWG.Add(1)
		go func() { defer w.procWG.Done(); w.runContainer(ctx, &c) }()
		go w.probeLoop(ctx, &c)
	}
	select {
	case <-w.stopCh:
	case <-ctx.Done():
		w.stop(5*time.Second, false)
	}
	w.finish(ctx)
}

// finish waits for the processes to end (they were signalled by runContainer) and deletes the object.
func (w *podWorker) finish(ctx context.Context) {
	done := make(chan struct{})
	go func() { w.procWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(w.stopGrace + 10*time.Second):
		klog.Warningf("pod %s/%s: processes did not exit in time", w.namespace, w.name)
	}
	if w.deleteObj {
		w.k.finalDelete(w.current())
	}
	_ = os.RemoveAll(w.dir)
	klog.Infof("pod %s/%s: stopped", w.namespace, w.name)
}

func (k *kubelet) finalDelete(p *corev1.Pod) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := k.client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To(int64(0)),
		Preconditions:      &metav1.Preconditions{UID: &p.UID},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		klog.Warningf("pod %s/%s: final delete: %v", p.Namespace, p.Name, err)
	}
}

func (w *podWorker) setWaiting(container, reason, msg string) {
	w.mu.Lock()
	for n, r := range w.runs {
		if container == "" || n == container {
			if !r.running {
				r.waitReason, r.waitMessage = reason, msg
			}
		}
	}
	w.mu.Unlock()
	w.markDirty()
}

// command resolves argv, environment and working dir for a container, like a
// kubelet would inside the image, with mount paths mapped to host dirs.
func (w *podWorker) command(p *corev1.Pod, c *corev1.Container) (argv []string, env []string, dir string, err error) {
	envl, err := w.containerEnv(p, c)
	if err != nil {
		return nil, nil, "", err
	}
	w.vmu.Lock()
	var mounts []hostMount
	for _, m := range c.VolumeMounts {
		hp, ok := w.volDirs[m.Name]
		if !ok {
			w.vmu.Unlock()
			return nil, nil, "", fmt.Errorf("volumeMount %q: no such volume", m.Name)
		}
		if m.SubPath != "" {
			hp = filepath.Join(hp, m.SubPath)
		}
		if mp := strings.TrimRight(m.MountPath, "/"); mp != "" {
			mounts = append(mounts, hostMount{mountPath: mp, hostPath: hp})
		}
	}
	w.vmu.Unlock()
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].mountPath) > len(mounts[j].mountPath) })

	bin, mapped := w.k.binaryForImage(c.Image)
	cmd := make([]string, 0, len(c.Command)+len(c.Args)+1)
	for _, s := range c.Command {
		cmd = append(cmd, expand(s, envl.get))
	}
	args := make([]string, 0, len(c.Args))
	for _, s := range c.Args {
		args = append(args, expand(s, envl.get))
	}
	if len(cmd) == 0 {
		if !mapped {
			return nil, nil, "", fmt.Errorf("image %q has no --image-bin mapping and the container has no command", c.Image)
		}
		cmd = []string{bin}
	} else {
		c0 := cmd[0]
		switch {
		case mapped && (c0 == bin || filepath.Base(c0) == filepath.Base(bin)):
			cmd[0] = bin
		case filepath.IsAbs(c0):
			if _, err := os.Stat(rewritePaths(c0, mounts)); err != nil {
				return nil, nil, "", fmt.Errorf("command %q: not the mapped binary of image %q and not on this host", c0, c.Image)
			}
			cmd[0] = rewritePaths(c0, mounts)
		case !strings.Contains(c0, "/"):
			lp, err := exec.LookPath(c0)
			if err != nil {
				return nil, nil, "", fmt.Errorf("command %q: not the mapped binary of image %q and not on PATH", c0, c.Image)
			}
			cmd[0] = lp
		default:
			return nil, nil, "", fmt.Errorf("command %q: relative paths are not supported", c0)
		}
	}
	argv = append(cmd, args...)
	for i := 1; i < len(argv); i++ {
		argv[i] = rewritePaths(argv[i], mounts)
	}
	for _, kv := range envl.environ() {
		k, v, _ := strings.Cut(kv, "=")
		env = append(env, k+"="+rewritePaths(v, mounts))
	}
	dir = w.dir
	if c.WorkingDir != "" {
		dir = rewritePaths(c.WorkingDir, mounts)
		if _, err := os.Stat(dir); err != nil {
			dir = w.dir
		}
	}
	return argv, env, dir, nil
}

// startProcess starts one attempt of a container; its output is appended to the container's log file.
func (w *podWorker) startProcess(p *corev1.Pod, c *corev1.Container, attempt int32) (*exec.Cmd, error) {
	argv, env, dir, err := w.command(p, c)
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(w.k.stateDir, "logs", w.logBase+"_"+c.Name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(lf, "=== process-kubelet: start #%d of %s/%s[%s] at %s: %q\n", attempt, p.Namespace, p.Name, c.Name, time.Now().Format(time.RFC3339), argv)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env, cmd.Dir, cmd.Stdout, cmd.Stderr = env, dir, lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, err
	}
	lf.Close()
	pidFile := filepath.Join(w.k.stateDir, "pids", "pod-"+w.logBase+"_"+c.Name+".pid")
	_ = os.WriteFile(pidFile, []byte(fmt.Sprint(cmd.Process.Pid)), 0o644)
	return cmd, nil
}

type exitInfo struct {
	code   int32
	signal int32
	reason string
}

func waitExit(cmd *exec.Cmd) exitInfo {
	err := cmd.Wait()
	if err == nil {
		return exitInfo{code: 0, reason: "Completed"}
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return exitInfo{code: 128 + int32(ws.Signal()), signal: int32(ws.Signal()), reason: "Error"}
		}
		return exitInfo{code: int32(ee.ExitCode()), reason: "Error"}
	}
	return exitInfo{code: 128, reason: "Error"}
}

func (w *podWorker) terminate(cmd *exec.Cmd, exited <-chan exitInfo, grace time.Duration) exitInfo {
	pgid := cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case e := <-exited:
		_ = syscall.Kill(-pgid, syscall.SIGKILL) // leftovers in the group
		return e
	case <-time.After(grace):
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	return <-exited
}

func (w *podWorker) runInit(ctx context.Context, c *corev1.Container) bool {
	backoff := time.Second
	for attempt := int32(0); ; attempt++ {
		if w.stopping() {
			return false
		}
		ok, _ := w.runOnce(ctx, c, attempt, true)
		if ok {
			return true
		}
		if w.current().Spec.RestartPolicy == corev1.RestartPolicyNever {
			return false
		}
		select {
		case <-w.stopCh:
			return false
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, w.k.maxBackoff)
	}
}

func (w *podWorker) runContainer(ctx context.Context, c *corev1.Container) {
	backoff := time.Second
	for attempt := int32(0); ; attempt++ {
		if w.stopping() {
			return
		}
		t0 := time.Now()
		ok, started := w.runOnce(ctx, c, attempt, false)
		if w.stopping() {
			return
		}
		policy := w.current().Spec.RestartPolicy
		if policy == corev1.RestartPolicyNever || (policy == corev1.RestartPolicyOnFailure && ok) {
			w.mu.Lock()
			r := w.runs[c.Name]
			r.term, r.lastTerm = r.lastTerm, nil
			w.mu.Unlock()
			w.markDirty()
			return
		}
		if started && time.Since(t0) > 2*w.k.maxBackoff {
			backoff = time.Second
		}
		w.setWaiting(c.Name, "CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container %s", backoff, c.Name))
		select {
		case <-w.stopCh:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, w.k.maxBackoff)
	}
}

// runOnce runs one attempt and reports (exited 0, process started).
func (w *podWorker) runOnce(ctx context.Context, c *corev1.Container, attempt int32, isInit bool) (bool, bool) {
	p := w.current()
	cmd, err := w.startProcess(p, c, attempt)
	w.mu.Lock()
	r := w.runs[c.Name]
	w.mu.Unlock()
	if err != nil {
		klog.Warningf("pod %s/%s[%s]: cannot start: %v", w.namespace, w.name, c.Name, err)
		w.mu.Lock()
		r.waitReason, r.waitMessage = "CreateContainerError", err.Error()
		w.mu.Unlock()
		w.markDirty()
		return false, false
	}
	w.mu.Lock()
	r.pid, r.running, r.started, r.startedAt = cmd.Process.Pid, true, true, metav1.Now()
	r.waitReason, r.waitMessage, r.term = "", "", nil
	r.ready = false
	w.mu.Unlock()
	w.markDirty()
	klog.Infof("pod %s/%s[%s]: started pid %d", w.namespace, w.name, c.Name, cmd.Process.Pid)

	exited := make(chan exitInfo, 1)
	go func() { exited <- waitExit(cmd) }()
	var e exitInfo
	select {
	case e = <-exited:
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	case <-w.stopCh:
		e = w.terminate(cmd, exited, w.stopGrace)
	case <-r.livenessKill:
		klog.Infof("pod %s/%s[%s]: liveness probe failed, restarting", w.namespace, w.name, c.Name)
		e = w.terminate(cmd, exited, time.Duration(ptr.Deref(p.Spec.TerminationGracePeriodSeconds, 30))*time.Second)
	}
	_ = os.Remove(filepath.Join(w.k.stateDir, "pids", "pod-"+w.logBase+"_"+c.Name+".pid"))
	klog.Infof("pod %s/%s[%s]: pid %d exited with %d", w.namespace, w.name, c.Name, cmd.Process.Pid, e.code)
	w.mu.Lock()
	r.running, r.ready, r.pid = false, false, 0
	r.lastTerm = &corev1.ContainerStateTerminated{
		ExitCode: e.code, Signal: e.signal, Reason: e.reason, StartedAt: r.startedAt, FinishedAt: metav1.Now(),
		ContainerID: fmt.Sprintf("process://%d", cmd.Process.Pid),
	}
	if !isInit && !w.stopping() {
		r.restarts++
	}
	if isInit && e.code == 0 {
		r.term, r.lastTerm = r.lastTerm, nil
	}
	w.mu.Unlock()
	w.markDirty()
	return e.code == 0, true
}

func (w *podWorker) tokenRefreshLoop(ctx context.Context) {
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-w.stopCh:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		p := w.current()
		only := map[string]bool{}
		w.vmu.Lock()
		for i := range p.Spec.Volumes {
			if v := p.Spec.Volumes[i]; v.Projected != nil {
				for _, s := range v.Projected.Sources {
					if s.ServiceAccountToken != nil {
						if w.volDeps[v.Name] == nil {
							w.volDeps[v.Name] = map[string]bool{}
						}
						w.volDeps[v.Name]["token"] = true
						only["token"] = true
					}
				}
			}
		}
		if len(only) > 0 {
			if err := w.syncVolumes(ctx, p, only); err != nil {
				klog.Warningf("pod %s/%s: token refresh: %v", w.namespace, w.name, err)
			}
		}
		w.vmu.Unlock()
	}
}
