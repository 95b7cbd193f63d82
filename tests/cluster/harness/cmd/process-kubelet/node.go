package main

import (
	"context"
	"net"
	"time"

	coordv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

type ownedNode struct {
	name string
	ip   string
}

const leaseSeconds = 40

func isLoopback(ip string) bool {
	p := net.ParseIP(ip)
	return p != nil && p.To4() != nil && p.IsLoopback()
}

func nodeIP(n *corev1.Node) string {
	for _, t := range []corev1.NodeAddressType{corev1.NodeInternalIP, corev1.NodeExternalIP} {
		for _, a := range n.Status.Addresses {
			if a.Type == t && isLoopback(a.Address) {
				return a.Address
			}
		}
	}
	return ""
}

func readyCondition(now metav1.Time) corev1.NodeCondition {
	return corev1.NodeCondition{
		Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		Message: "process-kubelet is posting ready status", LastHeartbeatTime: now, LastTransitionTime: now,
	}
}

func nodeStatus(ip, name string) corev1.NodeStatus {
	now := metav1.Now()
	rl := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("32"),
		corev1.ResourceMemory:           resource.MustParse("256Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
	return corev1.NodeStatus{
		Capacity: rl, Allocatable: rl,
		Phase:      corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{readyCondition(now)},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: ip},
			{Type: corev1.NodeHostName, Address: name},
		},
		NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion: "v0.0.0-process-kubelet", OperatingSystem: "linux", Architecture: "amd64",
			ContainerRuntimeVersion: "process://0",
		},
	}
}

// ensureNode creates the node (status is accepted on create for Nodes) or adopts an existing one.
func (k *kubelet) ensureNode(ctx context.Context, name, ip string, labels map[string]string) error {
	l := map[string]string{
		"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
		"type": "process",
	}
	for kk, v := range labels {
		l[kk] = v
	}
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l, Annotations: map[string]string{processNodeAnnotation: "true"}},
		Status:     nodeStatus(ip, name),
	}
	_, err := k.client.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		err = nil
	}
	if err == nil {
		k.mu.Lock()
		k.nodes[name] = &ownedNode{name: name, ip: ip}
		k.mu.Unlock()
		k.heartbeat(ctx, name, ip)
	}
	return err
}

// nodeSeen adopts nodes annotated derp-fleet.test/process-node=true that carry a loopback address.
func (k *kubelet) nodeSeen(ctx context.Context, n *corev1.Node) {
	if n.Annotations[processNodeAnnotation] != "true" {
		return
	}
	if _, ok := k.ownsNode(n.Name); ok {
		return
	}
	ip := nodeIP(n)
	if ip == "" {
		klog.Warningf("node %s is annotated %s but has no 127.x InternalIP/ExternalIP; not adopting", n.Name, processNodeAnnotation)
		return
	}
	k.mu.Lock()
	k.nodes[n.Name] = &ownedNode{name: n.Name, ip: ip}
	k.mu.Unlock()
	klog.Infof("adopted node %s (%s)", n.Name, ip)
	go k.heartbeat(ctx, n.Name, ip)
}

func (k *kubelet) nodeGone(name string) {
	k.mu.Lock()
	delete(k.nodes, name)
	var ws []*podWorker
	for _, w := range k.workers {
		if w.node.name == name {
			ws = append(ws, w)
		}
	}
	k.mu.Unlock()
	// The pod GC will delete the pods of a deleted node; stop their processes now.
	for _, w := range ws {
		w.forceGone()
	}
}

func (k *kubelet) heartbeatLoop(ctx context.Context) {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		k.mu.Lock()
		var ns []ownedNode
		for _, n := range k.nodes {
			ns = append(ns, *n)
		}
		k.mu.Unlock()
		for _, n := range ns {
			k.heartbeat(ctx, n.name, n.ip)
		}
	}
}

// heartbeat renews the node Lease and the Ready condition's heartbeat, as a kubelet does.
func (k *kubelet) heartbeat(ctx context.Context, name, ip string) {
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// A node annotated heartbeat=paused is a kubelet cut off from the API server: no Lease
	// renewal and no Ready heartbeat, so the node lifecycle controller marks it NotReady after
	// its grace period while the pods' processes keep running.
	if n, err := k.client.CoreV1().Nodes().Get(hctx, name, metav1.GetOptions{}); err == nil &&
		n.Annotations[heartbeatAnnotation] == "paused" {
		return
	}
	now := metav1.NewMicroTime(time.Now())
	leases := k.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	l, err := leases.Get(hctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		node, nerr := k.client.CoreV1().Nodes().Get(hctx, name, metav1.GetOptions{})
		if nerr != nil {
			klog.Warningf("lease for %s: node: %v", name, nerr)
			return
		}
		l = &coordv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: corev1.NamespaceNodeLease,
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: name, UID: node.UID}}},
			Spec: coordv1.LeaseSpec{HolderIdentity: ptr.To(name), LeaseDurationSeconds: ptr.To(int32(leaseSeconds)), RenewTime: &now},
		}
		if _, err := leases.Create(hctx, l, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			klog.Warningf("lease for %s: %v", name, err)
		}
	case err != nil:
		klog.Warningf("lease for %s: %v", name, err)
	default:
		l.Spec.RenewTime = &now
		if _, err := leases.Update(hctx, l, metav1.UpdateOptions{}); err != nil {
			klog.V(2).Infof("lease for %s: %v", name, err)
		}
	}
	node, err := k.client.CoreV1().Nodes().Get(hctx, name, metav1.GetOptions{})
	if err != nil {
		return
	}
	mnow := metav1.Now()
	found := false
	for i := range node.Status.Conditions {
		c := &node.Status.Conditions[i]
		if c.Type == corev1.NodeReady {
			found = true
			if c.Status != corev1.ConditionTrue {
				*c = readyCondition(mnow)
			} else {
				c.LastHeartbeatTime = mnow
			}
		}
	}
	if !found {
		node.Status.Conditions = append(node.Status.Conditions, readyCondition(mnow))
	}
	if len(node.Status.Capacity) == 0 {
		st := nodeStatus(ip, name)
		node.Status.Capacity, node.Status.Allocatable, node.Status.NodeInfo = st.Capacity, st.Allocatable, st.NodeInfo
	}
	if _, err := k.client.CoreV1().Nodes().UpdateStatus(hctx, node, metav1.UpdateOptions{}); err != nil {
		klog.V(2).Infof("node status %s: %v", name, err)
	}
}
