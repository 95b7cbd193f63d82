// Command rigctl holds small helpers for tests against the cluster rig:
//
//	rigctl freeport [N]                     print N free TCP ports on 127.0.0.1
//	rigctl create-nodes [flags]             create kwok (or process) nodes with 127.x addresses
//	rigctl pod-ready NS POD true|false      set a (kwok) pod's Ready condition through the status subresource
//	rigctl delete-node NAME [--force-pods]  delete a node (and, with --force-pods, its pods at once)
//
// Cluster access comes from KUBECONFIG.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
)

func die(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "rigctl: "+format+"\n", a...)
	os.Exit(1)
}

func client() kubernetes.Interface {
	kc := os.Getenv("KUBECONFIG")
	if kc == "" {
		die("KUBECONFIG is not set (source the rig's env file)")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil {
		die("kubeconfig %s: %v", kc, err)
	}
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		die("%v", err)
	}
	return c
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

func main() {
	if len(os.Args) < 2 {
		die("usage: rigctl freeport|create-nodes|pod-ready|delete-node ...")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := os.Args[2:]
	switch os.Args[1] {
	case "freeport":
		n := 1
		if len(args) > 0 {
			var err error
			if n, err = strconv.Atoi(args[0]); err != nil || n < 1 || n > 100 {
				die("freeport: N must be 1..100")
			}
		}
		var ls []net.Listener
		for i := 0; i < n; i++ {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				die("freeport: %v", err)
			}
			ls = append(ls, l)
		}
		for _, l := range ls {
			fmt.Println(l.Addr().(*net.TCPAddr).Port)
			l.Close()
		}
	case "create-nodes":
		createNodes(ctx, args)
	case "pod-ready":
		if len(args) != 3 {
			die("usage: rigctl pod-ready NAMESPACE POD true|false")
		}
		podReady(ctx, args[0], args[1], args[2] == "true")
	case "delete-node":
		fs := flag.NewFlagSet("delete-node", flag.ExitOnError)
		force := fs.Bool("force-pods", false, "also delete the node's pods with grace 0 (as the pod GC would, later)")
		name := ""
		if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
			name, args = args[0], args[1:]
		}
		_ = fs.Parse(args)
		if name == "" {
			name = fs.Arg(0)
		}
		if name == "" {
			die("usage: rigctl delete-node NAME [--force-pods]")
		}
		c := client()
		if err := c.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			die("delete node %s: %v", name, err)
		}
		if *force {
			pods, err := c.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + name})
			if err != nil {
				die("list pods of %s: %v", name, err)
			}
			for _, p := range pods.Items {
				_ = c.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))})
			}
		}
	default:
		die("unknown command %q", os.Args[1])
	}
}

func createNodes(ctx context.Context, args []string) {
	fs := flag.NewFlagSet("create-nodes", flag.ExitOnError)
	count := fs.Int("count", 1, "how many nodes")
	prefix := fs.String("prefix", "kwok-node-", "node name prefix; names are PREFIX0, PREFIX1, ...")
	firstIP := fs.String("first-ip", "127.0.1.1", "address of the first node; the next ones count up (must stay in 127.0.0.0/8)")
	process := fs.Bool("process", false, "make process nodes (run by process-kubelet) instead of kwok nodes")
	external := fs.Bool("external-ip", false, "also publish the address as ExternalIP")
	var labels, taints, annotations multi
	fs.Var(&labels, "label", "KEY=VALUE (repeatable)")
	fs.Var(&annotations, "annotation", "KEY=VALUE (repeatable)")
	fs.Var(&taints, "taint", "KEY[=VALUE]:EFFECT (repeatable)")
	_ = fs.Parse(args)
	ip := net.ParseIP(*firstIP).To4()
	if ip == nil || !ip.IsLoopback() {
		die("--first-ip %q is not in 127.0.0.0/8", *firstIP)
	}
	c := client()
	for i := 0; i < *count; i++ {
		addr := make(net.IP, 4)
		copy(addr, ip)
		v := uint32(addr[0])<<24 | uint32(addr[1])<<16 | uint32(addr[2])<<8 | uint32(addr[3])
		v += uint32(i)
		addr = net.IPv4(byte(v>>24), byte(v>>16), byte(v>>8), byte(v)).To4()
		if !addr.IsLoopback() {
			die("address %s left 127.0.0.0/8", addr)
		}
		name := fmt.Sprintf("%s%d", *prefix, i)
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
			Name:        name,
			Labels:      map[string]string{"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"},
			Annotations: map[string]string{},
		}}
		if *process {
			n.Annotations["derp-fleet.test/process-node"] = "true"
			n.Labels["type"] = "process"
		} else {
			n.Annotations["kwok.x-k8s.io/node"] = "fake"
			n.Labels["type"] = "kwok"
		}
		for _, l := range labels {
			k, val, _ := strings.Cut(l, "=")
			n.Labels[k] = val
		}
		for _, a := range annotations {
			k, val, _ := strings.Cut(a, "=")
			n.Annotations[k] = val
		}
		for _, t := range taints {
			kv, eff, ok := strings.Cut(t, ":")
			if !ok {
				die("--taint %q: want KEY[=VALUE]:EFFECT", t)
			}
			k, val, _ := strings.Cut(kv, "=")
			n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: k, Value: val, Effect: corev1.TaintEffect(eff)})
		}
		rl := corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("32"), corev1.ResourceMemory: resource.MustParse("256Gi"),
			corev1.ResourcePods: resource.MustParse("110"),
		}
		n.Status.Capacity, n.Status.Allocatable = rl, rl
		n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: addr.String()}}
		if *external {
			n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: addr.String()})
		}
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeHostName, Address: name})
		if _, err := c.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
			die("create node %s: %v", name, err)
		}
		fmt.Printf("%s %s\n", name, addr)
	}
}

func podReady(ctx context.Context, ns, name string, ready bool) {
	c := client()
	p, err := c.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		die("get pod %s/%s: %v", ns, name, err)
	}
	st := "False"
	if ready {
		st = "True"
	}
	now := metav1.Now()
	var conds []map[string]any
	for _, t := range []string{"Ready", "ContainersReady"} {
		conds = append(conds, map[string]any{"type": t, "status": st, "lastTransitionTime": now})
	}
	var cs []map[string]any
	for _, s := range p.Status.ContainerStatuses {
		cs = append(cs, map[string]any{"name": s.Name, "ready": ready})
	}
	body, _ := json.Marshal(map[string]any{"status": map[string]any{"conditions": conds, "containerStatuses": cs}})
	if _, err := c.CoreV1().Pods(ns).Patch(ctx, name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status"); err != nil {
		die("patch pod %s/%s status: %v", ns, name, err)
	}
}
