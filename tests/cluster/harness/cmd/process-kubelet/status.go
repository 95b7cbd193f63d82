package main

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
)

// statusLoop writes the pod status whenever something changed, at most every 200ms.
func (w *podWorker) statusLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.dirty:
		}
		time.Sleep(200 * time.Millisecond)
		if err := w.writeStatus(ctx); err != nil && !apierrors.IsNotFound(err) {
			klog.Warningf("pod %s/%s: status: %v", w.namespace, w.name, err)
			w.markDirty()
			time.Sleep(time.Second)
		}
		if apierrors.IsNotFound(w.lastErr) {
			return
		}
	}
}

func (w *podWorker) containerStatus(c corev1.Container) corev1.ContainerStatus {
	r := w.runs[c.Name]
	cs := corev1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: "process://" + c.Image, RestartCount: r.restarts, Ready: r.ready}
	started := r.running
	cs.Started = &started
	if r.lastTerm != nil && (r.running || r.waitReason != "") {
		cs.LastTerminationState = corev1.ContainerState{Terminated: r.lastTerm}
	}
	switch {
	case r.running:
		cs.ContainerID = fmt.Sprintf("process://%d", r.pid)
		cs.State.Running = &corev1.ContainerStateRunning{StartedAt: r.startedAt}
	case r.term != nil:
		cs.ContainerID = r.term.ContainerID
		cs.State.Terminated = r.term
	default:
		reason := r.waitReason
		if reason == "" {
			reason = "ContainerCreating"
		}
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: reason, Message: r.waitMessage}
	}
	return cs
}

func setCondition(conds []corev1.PodCondition, t corev1.PodConditionType, ok bool, reason string) []corev1.PodCondition {
	st := corev1.ConditionFalse
	if ok {
		st = corev1.ConditionTrue
	}
	now := metav1.Now()
	for i := range conds {
		if conds[i].Type == t {
			if conds[i].Status != st {
				conds[i].LastTransitionTime = now
			}
			conds[i].Status, conds[i].Reason = st, reason
			if ok {
				conds[i].Reason = ""
			}
			return conds
		}
	}
	c := corev1.PodCondition{Type: t, Status: st, LastTransitionTime: now}
	if !ok {
		c.Reason = reason
	}
	return append(conds, c)
}

func (w *podWorker) writeStatus(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var err error
	for try := 0; try < 5; try++ {
		var p *corev1.Pod
		p, err = w.k.client.CoreV1().Pods(w.namespace).Get(ctx, w.name, metav1.GetOptions{})
		if err != nil {
			break
		}
		if p.UID != w.uid {
			err = apierrors.NewNotFound(corev1.Resource("pods"), w.name)
			break
		}
		w.mu.Lock()
		st := p.Status.DeepCopy()
		st.HostIP, st.PodIP = w.node.ip, w.node.ip
		st.HostIPs = []corev1.HostIP{{IP: w.node.ip}}
		st.PodIPs = []corev1.PodIP{{IP: w.node.ip}}
		if st.StartTime == nil {
			now := metav1.Now()
			st.StartTime = &now
		}
		st.InitContainerStatuses, st.ContainerStatuses = nil, nil
		for _, c := range p.Spec.InitContainers {
			st.InitContainerStatuses = append(st.InitContainerStatuses, w.containerStatus(c))
		}
		allReady, anyRunning, allTerm, allOK := true, false, true, true
		for _, c := range p.Spec.Containers {
			cs := w.containerStatus(c)
			st.ContainerStatuses = append(st.ContainerStatuses, cs)
			allReady = allReady && cs.Ready
			anyRunning = anyRunning || cs.State.Running != nil
			allTerm = allTerm && cs.State.Terminated != nil
			allOK = allOK && cs.State.Terminated != nil && cs.State.Terminated.ExitCode == 0
		}
		initOK := w.initOK
		w.mu.Unlock()
		switch {
		case allTerm && allOK:
			st.Phase = corev1.PodSucceeded
		case allTerm:
			st.Phase = corev1.PodFailed
		case initOK && (anyRunning || p.Status.Phase == corev1.PodRunning):
			st.Phase = corev1.PodRunning
		default:
			st.Phase = corev1.PodPending
		}
		gatesOK := true
		for _, g := range p.Spec.ReadinessGates {
			found := false
			for _, c := range st.Conditions {
				if c.Type == g.ConditionType && c.Status == corev1.ConditionTrue {
					found = true
				}
			}
			gatesOK = gatesOK && found
		}
		st.Conditions = setCondition(st.Conditions, corev1.PodReadyToStartContainers, true, "")
		st.Conditions = setCondition(st.Conditions, corev1.PodInitialized, initOK, "ContainersNotInitialized")
		st.Conditions = setCondition(st.Conditions, corev1.ContainersReady, allReady && initOK, "ContainersNotReady")
		reason := "ContainersNotReady"
		if allReady && !gatesOK {
			reason = "ReadinessGatesNotReady"
		}
		st.Conditions = setCondition(st.Conditions, corev1.PodReady, allReady && initOK && gatesOK, reason)
		p.Status = *st
		_, err = w.k.client.CoreV1().Pods(w.namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
		if !apierrors.IsConflict(err) {
			break
		}
	}
	w.lastErr = err
	return err
}
