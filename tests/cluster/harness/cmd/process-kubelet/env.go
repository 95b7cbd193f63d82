package main

import (
	"fmt"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// expand implements the Kubernetes $(VAR) reference syntax used in env values,
// command and args: $(NAME) is replaced when NAME is known and left as written
// when not; $$ is an escaped $ (so $$(NAME) yields the literal $(NAME)); any
// other $ is kept.
func expand(in string, lookup func(string) (string, bool)) string {
	var b strings.Builder
	for i := 0; i < len(in); i++ {
		c := in[i]
		if c != '$' || i+1 >= len(in) {
			b.WriteByte(c)
			continue
		}
		switch next := in[i+1]; next {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(in[i+2:], ')')
			if end < 0 { // unterminated: keep the rest as written
				b.WriteString(in[i:])
				return b.String()
			}
			name := in[i+2 : i+2+end]
			if v, ok := lookup(name); ok && name != "" {
				b.WriteString(v)
			} else {
				b.WriteString("$(" + name + ")")
			}
			i += 2 + end
		default:
			b.WriteByte('$')
			b.WriteByte(next)
			i++
		}
	}
	return b.String()
}

// envList keeps insertion order with last-wins values, like a container's environment.
type envList struct {
	order []string
	vals  map[string]string
}

func newEnvList() *envList { return &envList{vals: map[string]string{}} }

func (e *envList) set(k, v string) {
	if _, ok := e.vals[k]; !ok {
		e.order = append(e.order, k)
	}
	e.vals[k] = v
}

func (e *envList) get(k string) (string, bool) { v, ok := e.vals[k]; return v, ok }

func (e *envList) environ() []string {
	out := make([]string, 0, len(e.order))
	for _, k := range e.order {
		out = append(out, k+"="+e.vals[k])
	}
	return out
}

// fieldValue resolves a downward-API fieldRef path for this pod on this node.
func fieldValue(p *corev1.Pod, nodeIP, path string) (string, error) {
	switch path {
	case "metadata.name":
		return p.Name, nil
	case "metadata.namespace":
		return p.Namespace, nil
	case "metadata.uid":
		return string(p.UID), nil
	case "spec.nodeName":
		return p.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return p.Spec.ServiceAccountName, nil
	case "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs":
		return nodeIP, nil
	case "metadata.labels", "metadata.annotations":
		m := p.Labels
		if path == "metadata.annotations" {
			m = p.Annotations
		}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var lines []string
		for _, k := range keys {
			lines = append(lines, fmt.Sprintf("%s=%q", k, m[k]))
		}
		return strings.Join(lines, "\n"), nil
	}
	for _, pre := range []string{"metadata.labels['", "metadata.annotations['"} {
		if strings.HasPrefix(path, pre) && strings.HasSuffix(path, "']") {
			key := path[len(pre) : len(path)-2]
			if pre == "metadata.labels['" {
				return p.Labels[key], nil
			}
			return p.Annotations[key], nil
		}
	}
	return "", fmt.Errorf("unsupported fieldRef %q", path)
}

func resourceValue(c *corev1.Container, ref *corev1.ResourceFieldSelector) string {
	name := corev1.ResourceName(strings.TrimPrefix(strings.TrimPrefix(ref.Resource, "limits."), "requests."))
	var q, ok = c.Resources.Limits[name]
	if strings.HasPrefix(ref.Resource, "requests.") {
		q, ok = c.Resources.Requests[name]
	}
	if !ok { // kubelet falls back to node allocatable; ours is fixed
		if name == corev1.ResourceCPU {
			return "32"
		}
		return "274877906944"
	}
	div := ref.Divisor
	if div.IsZero() {
		return q.String()
	}
	if name == corev1.ResourceCPU {
		v := (q.MilliValue() + div.MilliValue() - 1) / div.MilliValue()
		return fmt.Sprint(v)
	}
	return fmt.Sprint((q.Value() + div.Value() - 1) / div.Value())
}

// containerEnv builds the environment as kubelet does: envFrom, then env in
// order with $(VAR) expansion against what is defined so far; service
// variables for the kubernetes Service point at the real API server.
func (w *podWorker) containerEnv(p *corev1.Pod, c *corev1.Container) (*envList, error) {
	k := w.k
	env := newEnvList()
	env.set("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	host := p.Name
	if p.Spec.HostNetwork {
		host = p.Spec.NodeName
	} else if p.Spec.Hostname != "" {
		host = p.Spec.Hostname
	}
	env.set("HOSTNAME", host)
	env.set("HOME", w.dir)
	for _, name := range k.passEnv {
		if v, ok := lookupHostEnv(name); ok {
			env.set(name, v)
		}
	}
	svc := map[string]string{
		"KUBERNETES_SERVICE_HOST":       k.apiHost,
		"KUBERNETES_SERVICE_PORT":       k.apiPort,
		"KUBERNETES_SERVICE_PORT_HTTPS": k.apiPort,
		"KUBERNETES_PORT":               "tcp://" + k.apiHost + ":" + k.apiPort,
		"KUBERNETES_PORT_443_TCP":       "tcp://" + k.apiHost + ":" + k.apiPort,
		"KUBERNETES_PORT_443_TCP_PROTO": "tcp",
		"KUBERNETES_PORT_443_TCP_PORT":  k.apiPort,
		"KUBERNETES_PORT_443_TCP_ADDR":  k.apiHost,
	}
	for _, key := range []string{"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBERNETES_SERVICE_PORT_HTTPS",
		"KUBERNETES_PORT", "KUBERNETES_PORT_443_TCP", "KUBERNETES_PORT_443_TCP_PROTO", "KUBERNETES_PORT_443_TCP_PORT", "KUBERNETES_PORT_443_TCP_ADDR"} {
		env.set(key, svc[key])
	}
	for _, ef := range c.EnvFrom {
		switch {
		case ef.ConfigMapRef != nil:
			cm, err := w.configMap(p.Namespace, ef.ConfigMapRef.Name)
			if err != nil {
				if ef.ConfigMapRef.Optional != nil && *ef.ConfigMapRef.Optional {
					continue
				}
				return nil, err
			}
			for kk, v := range cm.Data {
				env.set(ef.Prefix+kk, v)
			}
		case ef.SecretRef != nil:
			s, err := w.secret(p.Namespace, ef.SecretRef.Name)
			if err != nil {
				if ef.SecretRef.Optional != nil && *ef.SecretRef.Optional {
					continue
				}
				return nil, err
			}
			for kk, v := range s.Data {
				env.set(ef.Prefix+kk, string(v))
			}
		}
	}
	for _, e := range c.Env {
		val := e.Value
		if e.ValueFrom == nil {
			val = expand(val, env.get)
		} else {
			vf := e.ValueFrom
			switch {
			case vf.FieldRef != nil:
				v, err := fieldValue(p, w.node.ip, vf.FieldRef.FieldPath)
				if err != nil {
					return nil, fmt.Errorf("env %s: %w", e.Name, err)
				}
				val = v
			case vf.ResourceFieldRef != nil:
				val = resourceValue(c, vf.ResourceFieldRef)
			case vf.SecretKeyRef != nil:
				ref := vf.SecretKeyRef
				s, err := w.secret(p.Namespace, ref.Name)
				var b []byte
				var ok bool
				if err == nil {
					b, ok = s.Data[ref.Key]
				}
				if err != nil || !ok {
					if ref.Optional != nil && *ref.Optional {
						continue
					}
					return nil, fmt.Errorf("env %s: secret %s/%s key %q: not found", e.Name, p.Namespace, ref.Name, ref.Key)
				}
				val = string(b)
			case vf.ConfigMapKeyRef != nil:
				ref := vf.ConfigMapKeyRef
				cm, err := w.configMap(p.Namespace, ref.Name)
				var ok bool
				if err == nil {
					val, ok = cm.Data[ref.Key]
				}
				if err != nil || !ok {
					if ref.Optional != nil && *ref.Optional {
						continue
					}
					return nil, fmt.Errorf("env %s: configmap %s/%s key %q: not found", e.Name, p.Namespace, ref.Name, ref.Key)
				}
			default:
				return nil, fmt.Errorf("env %s: unsupported valueFrom", e.Name)
			}
		}
		env.set(e.Name, val)
	}
	return env, nil
}

// rewritePaths replaces a volume mount's path, where it stands as a whole
// path prefix, with the host directory that backs it.
// rewritePaths replaces each volume's mountPath in s by its host directory, in one pass over s
// (longest mountPath first at each position), so a host path already written is never rewritten
// again by a shorter mountPath such as /tmp.
func rewritePaths(s string, mounts []hostMount) string {
	var b strings.Builder
	i := 0
	for i < len(s) {
		matched := false
		if i == 0 || !isPathChar(s[i-1]) {
			for _, m := range mounts { // longest mountPath first
				if m.mountPath == "" || !strings.HasPrefix(s[i:], m.mountPath) {
					continue
				}
				end := i + len(m.mountPath)
				if end == len(s) || s[end] == '/' || !isPathChar(s[end]) {
					b.WriteString(m.hostPath)
					i = end
					matched = true
					break
				}
			}
		}
		if !matched {
			b.WriteByte(s[i])
			i++
		}
	}
	return b.String()
}

func isPathChar(c byte) bool {
	return c == '/' || c == '.' || c == '_' || c == '-' || c == '~' ||
		(c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
}
