// Command svcproxy does kube-proxy's job for one Service on the cluster rig, which has no
// kube-proxy: it listens on a loopback address that stands for the Service (its "cluster IP")
// and forwards each TCP connection to one of the Service's ready endpoints.
//
//	svcproxy --namespace NS --service NAME [--port NAME|NUMBER] --listen 127.0.1.1:80
//
// Endpoints come from the Service's EndpointSlices, like kube-proxy's. The API server refuses
// loopback addresses in EndpointSlices (ValidateEndpointIP), and every pod on the rig's process
// nodes has a 127.x pod IP, so for those Services the slices stay empty; svcproxy then computes
// the endpoints exactly as the EndpointSlice controller would: the pods matching the Service's
// selector, Ready and not terminating, with the target port resolved (by name through the
// container ports). Only 127.0.0.0/8 endpoints are ever dialled.
//
// Connections are spread round-robin over the ready endpoints; a refused dial tries the next
// one. Every change of the ready set is logged with a timestamp ("endpoints: [...]").
// Cluster access comes from KUBECONFIG.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

type proxy struct {
	ns, svc, port string
	inf           informers.SharedInformerFactory
	rr            atomic.Uint64
	mu            sync.Mutex
	last          string
	// Endpoint networks dialled besides 127.0.0.0/8: the pod network of a real-kubelet rig, which
	// exists only inside the test's network namespace (--allow-net).
	allow []*net.IPNet
}

// allowed: a loopback endpoint, or one in an --allow-net network.
func (p *proxy) allowed(ip net.IP) bool {
	if ip == nil {
		return false
	}
	if ip.IsLoopback() {
		return true
	}
	for _, n := range p.allow {
		if n.Contains(ip) {
			return true
		}
	}
	return false
}

func main() {
	var p proxy
	var listen string
	flag.StringVar(&p.ns, "namespace", "default", "namespace of the Service")
	flag.StringVar(&p.svc, "service", "", "name of the Service")
	flag.StringVar(&p.port, "port", "", "Service port (name or number); the first one when empty")
	flag.StringVar(&listen, "listen", "", "loopback address:port standing for the Service")
	flag.Func("allow-net", "also dial endpoints in this CIDR (repeatable; e.g. a real-kubelet rig's pod network in the test's namespace)", func(v string) error {
		_, n, err := net.ParseCIDR(v)
		if err == nil {
			p.allow = append(p.allow, n)
		}
		return err
	})
	flag.Parse()
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetPrefix("svcproxy: ")
	if p.svc == "" || listen == "" {
		log.Fatal("--service and --listen are required")
	}
	host, _, err := net.SplitHostPort(listen)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		log.Fatalf("--listen %q: must be a 127.0.0.0/8 address:port", listen)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", os.Getenv("KUBECONFIG"))
	if err != nil {
		log.Fatalf("kubeconfig: %v", err)
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	p.inf = informers.NewSharedInformerFactoryWithOptions(c, 0, informers.WithNamespace(p.ns))
	svcs := p.inf.Core().V1().Services().Informer()
	pods := p.inf.Core().V1().Pods().Informer()
	slices := p.inf.Discovery().V1().EndpointSlices().Informer()
	p.inf.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), svcs.HasSynced, pods.HasSynced, slices.HasSynced) {
		log.Fatal("caches did not sync")
	}
	changed := func() { p.logChange() }
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { changed() },
		UpdateFunc: func(any, any) { changed() },
		DeleteFunc: func(any) { changed() },
	}
	for _, i := range []cache.SharedIndexInformer{svcs, pods, slices} {
		if _, err := i.AddEventHandler(h); err != nil {
			log.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("listening on %s for service %s/%s", listen, p.ns, p.svc)
	p.logChange()
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Printf("accept: %v", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go p.forward(conn)
	}
}

func (p *proxy) logChange() {
	eps, src, err := p.endpoints()
	s := fmt.Sprintf("%v (from %s)", eps, src)
	if err != nil {
		s = "error: " + err.Error()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if s != p.last {
		p.last = s
		log.Printf("endpoints: %s", s)
	}
}

// endpoints returns the ready endpoints (ip:port) of the Service's chosen port.
func (p *proxy) endpoints() ([]string, string, error) {
	svc, err := p.inf.Core().V1().Services().Lister().Services(p.ns).Get(p.svc)
	if err != nil {
		return nil, "", err
	}
	var sp *corev1.ServicePort
	for i := range svc.Spec.Ports {
		q := &svc.Spec.Ports[i]
		if p.port == "" || q.Name == p.port || strconv.Itoa(int(q.Port)) == p.port {
			sp = q
			break
		}
	}
	if sp == nil {
		return nil, "", fmt.Errorf("service %s/%s has no port %q", p.ns, p.svc, p.port)
	}
	var out []string
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: p.svc})
	sl, _ := p.inf.Discovery().V1().EndpointSlices().Lister().EndpointSlices(p.ns).List(sel)
	for _, s := range sl {
		var port int32
		for _, q := range s.Ports {
			if q.Port != nil && (q.Name == nil && sp.Name == "" || q.Name != nil && *q.Name == sp.Name) {
				port = *q.Port
			}
		}
		if port == 0 {
			continue
		}
		for _, e := range s.Endpoints {
			if e.Conditions.Ready != nil && !*e.Conditions.Ready {
				continue
			}
			for _, a := range e.Addresses {
				out = append(out, net.JoinHostPort(a, strconv.Itoa(int(port))))
			}
		}
	}
	if len(out) > 0 || len(svc.Spec.Selector) == 0 {
		sort.Strings(out)
		return out, "endpointslices", nil
	}
	// What the EndpointSlice controller would publish, were loopback addresses allowed.
	pods, _ := p.inf.Core().V1().Pods().Lister().Pods(p.ns).List(labels.SelectorFromSet(svc.Spec.Selector))
	for _, pod := range pods {
		if pod.DeletionTimestamp != nil || pod.Status.PodIP == "" || !podReady(pod) {
			continue
		}
		port, ok := targetPort(pod, sp.TargetPort, sp.Port)
		if !ok {
			continue
		}
		out = append(out, net.JoinHostPort(pod.Status.PodIP, strconv.Itoa(int(port))))
	}
	sort.Strings(out)
	return out, "pods", nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func targetPort(p *corev1.Pod, tp intstr.IntOrString, svcPort int32) (int32, bool) {
	if tp.Type == intstr.Int {
		if tp.IntVal == 0 {
			return svcPort, true
		}
		return tp.IntVal, true
	}
	for _, c := range p.Spec.Containers {
		for _, q := range c.Ports {
			if q.Name == tp.StrVal && (q.Protocol == "" || q.Protocol == corev1.ProtocolTCP) {
				return q.ContainerPort, true
			}
		}
	}
	return 0, false
}

func (p *proxy) forward(in net.Conn) {
	defer in.Close()
	eps, _, err := p.endpoints()
	if err != nil || len(eps) == 0 {
		log.Printf("%s: no ready endpoint (%v)", in.RemoteAddr(), err)
		return
	}
	start := int(p.rr.Add(1))
	var out net.Conn
	for i := range eps {
		ep := eps[(start+i)%len(eps)]
		host, _, _ := net.SplitHostPort(ep)
		if !p.allowed(net.ParseIP(host)) {
			log.Printf("refusing endpoint %s: not loopback and not in --allow-net", ep)
			continue
		}
		out, err = net.DialTimeout("tcp", ep, 2*time.Second)
		if err == nil {
			break
		}
		log.Printf("dial %s: %v", ep, err)
	}
	if out == nil {
		return
	}
	defer out.Close()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if c, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = c.CloseWrite()
		}
		done <- struct{}{}
	}
	go pipe(out, in)
	go pipe(in, out)
	<-done
	<-done
}
