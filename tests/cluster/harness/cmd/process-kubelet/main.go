// Command process-kubelet is the cluster rig's kubelet for "process nodes":
// it owns Nodes (created from --node flags, or any Node annotated
// derp-fleet.test/process-node=true), heartbeats them, and runs every Pod bound
// to them as a local process, from exactly the spec the API server holds.
//
// Images map to local binaries (--image-bin repo/name=/abs/path). Volumes are
// materialised under --state-dir in kubelet's atomic "..data" layout and kept
// current; mountPath prefixes in command/args/env are rewritten to those dirs.
// Pod status (phase, IPs, containerStatuses, Ready from the pod's own
// readinessProbe) is written back like a kubelet would.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

const processNodeAnnotation = "derp-fleet.test/process-node"

// heartbeatAnnotation "paused" on a node stops its heartbeats (a kubelet that lost the API server).
const heartbeatAnnotation = "derp-fleet.test/heartbeat"

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(s string) error { *m = append(*m, s); return nil }

type kubelet struct {
	client     kubernetes.Interface
	stateDir   string
	imageBins  map[string]string
	apiHost    string
	apiPort    string
	caPEM      []byte
	passEnv    []string
	maxBackoff time.Duration

	factory   informers.SharedInformerFactory
	podLister interface {
		Get(ns, name string) (*corev1.Pod, error)
	}
	secrets    cache.Indexer
	configMaps cache.Indexer

	mu      sync.Mutex
	nodes   map[string]*ownedNode    // node name -> node
	workers map[types.UID]*podWorker // pod uid -> worker
	wg      sync.WaitGroup
}

func main() {
	klog.InitFlags(nil)
	var nodeFlags, imageFlags, nodeLabels, passEnv multiFlag
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the cluster")
	stateDir := flag.String("state-dir", "", "directory for pod volumes, logs and pid files (required)")
	flag.Var(&nodeFlags, "node", "NAME=IP: create and own this node (repeatable); IP must be in 127.0.0.0/8")
	flag.Var(&nodeLabels, "node-label", "KEY=VALUE label for nodes created from --node (repeatable)")
	flag.Var(&imageFlags, "image-bin", "REPO/NAME=/abs/path: run this binary for that image, tag ignored (repeatable)")
	flag.Var(&passEnv, "pass-env", "NAME of a variable of this process's environment to pass to every container (repeatable)")
	apiServiceHost := flag.String("kubernetes-service-host", "127.0.0.1", "KUBERNETES_SERVICE_HOST given to containers")
	apiServicePort := flag.String("kubernetes-service-port", "", "KUBERNETES_SERVICE_PORT given to containers (default: the kubeconfig server's port)")
	maxBackoff := flag.Duration("max-restart-backoff", 20*time.Second, "longest wait before restarting a crashed container")
	flag.Parse()
	if *stateDir == "" || *kubeconfig == "" {
		fmt.Fprintln(os.Stderr, "process-kubelet: --state-dir and --kubeconfig (or KUBECONFIG) are required")
		os.Exit(2)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		klog.Fatalf("loading kubeconfig %s: %v", *kubeconfig, err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	cfg.UserAgent = "process-kubelet"
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		klog.Fatalf("client: %v", err)
	}
	port := *apiServicePort
	if port == "" {
		u, err := url.Parse(cfg.Host)
		if err != nil || u.Port() == "" {
			klog.Fatalf("cannot take the API port from server %q; pass --kubernetes-service-port", cfg.Host)
		}
		port = u.Port()
	}
	ca := cfg.TLSClientConfig.CAData
	if len(ca) == 0 && cfg.TLSClientConfig.CAFile != "" {
		if ca, err = os.ReadFile(cfg.TLSClientConfig.CAFile); err != nil {
			klog.Fatalf("reading CA %s: %v", cfg.TLSClientConfig.CAFile, err)
		}
	}
	sd, err := filepath.Abs(*stateDir)
	if err != nil {
		klog.Fatal(err)
	}
	for _, d := range []string{"pods", "logs", "pids"} {
		if err := os.MkdirAll(filepath.Join(sd, d), 0o755); err != nil {
			klog.Fatal(err)
		}
	}
	k := &kubelet{
		client: client, stateDir: sd, imageBins: map[string]string{},
		apiHost: *apiServiceHost, apiPort: port, caPEM: ca, passEnv: passEnv, maxBackoff: *maxBackoff,
		nodes: map[string]*ownedNode{}, workers: map[types.UID]*podWorker{},
	}
	for _, f := range imageFlags {
		img, bin, ok := strings.Cut(f, "=")
		if !ok || !filepath.IsAbs(bin) {
			klog.Fatalf("--image-bin %q: want REPO/NAME=/abs/path", f)
		}
		if _, err := os.Stat(bin); err != nil {
			klog.Fatalf("--image-bin %q: %v", f, err)
		}
		k.imageBins[imageRepo(img)] = bin
	}
	labels := map[string]string{}
	for _, l := range nodeLabels {
		kk, v, _ := strings.Cut(l, "=")
		labels[kk] = v
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	for _, nf := range nodeFlags {
		name, ip, ok := strings.Cut(nf, "=")
		if !ok || !isLoopback(ip) {
			klog.Fatalf("--node %q: want NAME=127.x.y.z", nf)
		}
		if err := k.ensureNode(ctx, name, ip, labels); err != nil {
			klog.Fatalf("creating node %s: %v", name, err)
		}
	}
	k.run(ctx)
	klog.Info("process-kubelet: stopping all pods")
	k.stopAll()
	klog.Info("process-kubelet: stopped")
}

func (k *kubelet) run(ctx context.Context) {
	k.factory = informers.NewSharedInformerFactory(k.client, 0)
	podInf := k.factory.Core().V1().Pods()
	nodeInf := k.factory.Core().V1().Nodes()
	secInf := k.factory.Core().V1().Secrets()
	cmInf := k.factory.Core().V1().ConfigMaps()
	k.secrets = secInf.Informer().GetIndexer()
	k.configMaps = cmInf.Informer().GetIndexer()
	pl := podInf.Lister()
	k.podLister = podGetter(func(ns, name string) (*corev1.Pod, error) { return pl.Pods(ns).Get(name) })

	nodeInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { k.nodeSeen(ctx, o.(*corev1.Node)) },
		UpdateFunc: func(_, o any) { k.nodeSeen(ctx, o.(*corev1.Node)) },
		DeleteFunc: func(o any) {
			if n, ok := o.(*corev1.Node); ok {
				k.nodeGone(n.Name)
			} else if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				k.nodeGone(strings.TrimPrefix(t.Key, "/"))
			}
		},
	})
	podInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { k.podSeen(ctx, o.(*corev1.Pod)) },
		UpdateFunc: func(_, o any) { k.podSeen(ctx, o.(*corev1.Pod)) },
		DeleteFunc: func(o any) {
			p, ok := o.(*corev1.Pod)
			if !ok {
				if t, ok2 := o.(cache.DeletedFinalStateUnknown); ok2 {
					p, _ = t.Obj.(*corev1.Pod)
				}
			}
			if p != nil {
				k.podDeleted(p)
			}
		},
	})
	refresh := func(kind string) func(o any) {
		return func(o any) {
			if m, ok := o.(interface {
				GetNamespace() string
				GetName() string
			}); ok {
				k.objectChanged(kind, m.GetNamespace(), m.GetName())
			}
		}
	}
	secInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: refresh("Secret"), UpdateFunc: func(_, o any) { refresh("Secret")(o) }, DeleteFunc: refresh("Secret"),
	})
	cmInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: refresh("ConfigMap"), UpdateFunc: func(_, o any) { refresh("ConfigMap")(o) }, DeleteFunc: refresh("ConfigMap"),
	})
	k.factory.Start(ctx.Done())
	k.factory.WaitForCacheSync(ctx.Done())
	klog.Info("process-kubelet: caches synced")
	go k.heartbeatLoop(ctx)
	<-ctx.Done()
	k.factory.Shutdown()
}

type podGetter func(ns, name string) (*corev1.Pod, error)

func (g podGetter) Get(ns, name string) (*corev1.Pod, error) { return g(ns, name) }

func (k *kubelet) ownsNode(name string) (*ownedNode, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	n, ok := k.nodes[name]
	return n, ok
}

func (k *kubelet) podSeen(ctx context.Context, p *corev1.Pod) {
	if p.Spec.NodeName == "" {
		return
	}
	node, ok := k.ownsNode(p.Spec.NodeName)
	if !ok {
		return
	}
	k.mu.Lock()
	w, exists := k.workers[p.UID]
	if !exists {
		if p.DeletionTimestamp != nil || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			k.mu.Unlock()
			if p.DeletionTimestamp != nil {
				// Never started here (or we restarted): nothing runs, just finish the deletion.
				k.finalDelete(p)
			}
			return
		}
		w = newPodWorker(k, p, node)
		k.workers[p.UID] = w
		k.wg.Add(1)
		k.mu.Unlock()
		go func() {
			defer k.wg.Done()
			w.run(ctx)
			k.mu.Lock()
			delete(k.workers, p.UID)
			k.mu.Unlock()
		}()
		return
	}
	k.mu.Unlock()
	w.update(p)
}

func (k *kubelet) podDeleted(p *corev1.Pod) {
	k.mu.Lock()
	w := k.workers[p.UID]
	k.mu.Unlock()
	if w != nil {
		w.forceGone()
	}
}

func (k *kubelet) objectChanged(kind, ns, name string) {
	k.mu.Lock()
	var ws []*podWorker
	for _, w := range k.workers {
		if w.namespace == ns {
			ws = append(ws, w)
		}
	}
	k.mu.Unlock()
	for _, w := range ws {
		w.objectChanged(kind, name)
	}
}

func (k *kubelet) stopAll() {
	k.mu.Lock()
	var ws []*podWorker
	for _, w := range k.workers {
		ws = append(ws, w)
	}
	k.mu.Unlock()
	for _, w := range ws {
		w.shutdown()
	}
	done := make(chan struct{})
	go func() { k.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		klog.Warning("process-kubelet: some pods did not stop within 15s")
	}
}

// imageRepo strips a tag or digest: "ghcr.io/x/derper:v1" -> "ghcr.io/x/derper".
func imageRepo(img string) string {
	if i := strings.Index(img, "@"); i >= 0 {
		img = img[:i]
	}
	if i := strings.LastIndex(img, ":"); i > strings.LastIndex(img, "/") {
		img = img[:i]
	}
	return img
}

func (k *kubelet) binaryForImage(img string) (string, bool) {
	r := imageRepo(img)
	if b, ok := k.imageBins[r]; ok {
		return b, true
	}
	// Allow a flag without the registry host to match "registry/repo/name".
	for key, b := range k.imageBins {
		if strings.HasSuffix(r, "/"+key) {
			return b, true
		}
	}
	return "", false
}
