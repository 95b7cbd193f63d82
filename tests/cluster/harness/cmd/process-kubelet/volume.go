package main

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

type fileData struct {
	data []byte
	mode os.FileMode
}

// atomicWrite publishes payload under dir with kubelet's layout: the files live
// in a timestamped "..<ts>" directory, "..data" is a symlink to it, and each
// top-level name is a symlink through "..data". An update writes a new
// timestamped dir and swaps "..data" with one rename, so readers always see a
// complete set. Returns whether anything changed.
func atomicWrite(dir string, payload map[string]fileData) (bool, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, err
	}
	dataLink := filepath.Join(dir, "..data")
	old, _ := os.Readlink(dataLink)
	if old != "" && sameContent(filepath.Join(dir, old), payload) {
		return false, nil
	}
	ts, err := os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05."))
	if err != nil {
		return false, err
	}
	if err := os.Chmod(ts, 0o755); err != nil {
		return false, err
	}
	for p, f := range payload {
		full := filepath.Join(ts, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return false, err
		}
		if err := os.WriteFile(full, f.data, f.mode); err != nil {
			return false, err
		}
		if err := os.Chmod(full, f.mode); err != nil {
			return false, err
		}
	}
	tmpLink := filepath.Join(dir, "..data_tmp")
	_ = os.Remove(tmpLink)
	if err := os.Symlink(filepath.Base(ts), tmpLink); err != nil {
		return false, err
	}
	if err := os.Rename(tmpLink, dataLink); err != nil {
		return false, err
	}
	tops := map[string]bool{}
	for p := range payload {
		top := strings.SplitN(filepath.ToSlash(p), "/", 2)[0]
		tops[top] = true
	}
	for top := range tops {
		link := filepath.Join(dir, top)
		if cur, err := os.Readlink(link); err == nil && cur == filepath.Join("..data", top) {
			continue
		}
		_ = os.Remove(link)
		if err := os.Symlink(filepath.Join("..data", top), link); err != nil {
			return false, err
		}
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "..") && !tops[e.Name()] {
			_ = os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
	if old != "" && old != filepath.Base(ts) {
		_ = os.RemoveAll(filepath.Join(dir, old))
	}
	return true, nil
}

func sameContent(dir string, payload map[string]fileData) bool {
	n := 0
	ok := true
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !ok {
			ok = false
			return filepath.SkipAll
		}
		if d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(dir, path)
		f, in := payload[rel]
		if !in {
			ok = false
			return filepath.SkipAll
		}
		b, err := os.ReadFile(path)
		info, ierr := d.Info()
		if err != nil || ierr != nil || !bytes.Equal(b, f.data) || info.Mode().Perm() != f.mode.Perm() {
			ok = false
			return filepath.SkipAll
		}
		n++
		return nil
	})
	return ok && n == len(payload)
}

func fileMode(item *int32, def *int32, fallback os.FileMode) os.FileMode {
	if item != nil {
		return os.FileMode(*item)
	}
	if def != nil {
		return os.FileMode(*def)
	}
	return fallback
}

func (w *podWorker) secret(ns, name string) (*corev1.Secret, error) {
	o, ok, err := w.k.secrets.GetByKey(ns + "/" + name)
	if err != nil || !ok {
		// The informer may lag a fresh object: ask the server.
		s, gerr := w.k.client.CoreV1().Secrets(ns).Get(context.TODO(), name, metav1.GetOptions{})
		if gerr != nil {
			return nil, fmt.Errorf("secret %s/%s: %w", ns, name, gerr)
		}
		return s, nil
	}
	return o.(*corev1.Secret), nil
}

func (w *podWorker) configMap(ns, name string) (*corev1.ConfigMap, error) {
	o, ok, err := w.k.configMaps.GetByKey(ns + "/" + name)
	if err != nil || !ok {
		c, gerr := w.k.client.CoreV1().ConfigMaps(ns).Get(context.TODO(), name, metav1.GetOptions{})
		if gerr != nil {
			return nil, fmt.Errorf("configmap %s/%s: %w", ns, name, gerr)
		}
		return c, nil
	}
	return o.(*corev1.ConfigMap), nil
}

func keyPayload(data map[string][]byte, items []corev1.KeyToPath, def *int32, what string, optional bool, out map[string]fileData) error {
	if len(items) == 0 {
		for k, v := range data {
			out[k] = fileData{v, fileMode(nil, def, 0o644)}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional {
				continue
			}
			return fmt.Errorf("%s has no key %q", what, it.Key)
		}
		out[it.Path] = fileData{v, fileMode(it.Mode, def, 0o644)}
	}
	return nil
}

func cmData(cm *corev1.ConfigMap) map[string][]byte {
	m := map[string][]byte{}
	for k, v := range cm.Data {
		m[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		m[k] = v
	}
	return m
}

// payloadFor computes a volume's files. deps receives "Secret/name" and
// "ConfigMap/name" keys the volume reads, so changes can re-publish it.
func (w *podWorker) payloadFor(ctx context.Context, p *corev1.Pod, v *corev1.Volume, deps map[string]bool) (map[string]fileData, error) {
	out := map[string]fileData{}
	switch {
	case v.Secret != nil:
		s := v.Secret
		deps["Secret/"+s.SecretName] = true
		sec, err := w.secret(p.Namespace, s.SecretName)
		if err != nil {
			if s.Optional != nil && *s.Optional {
				return out, nil
			}
			return nil, err
		}
		return out, keyPayload(sec.Data, s.Items, s.DefaultMode, "secret "+s.SecretName, s.Optional != nil && *s.Optional, out)
	case v.ConfigMap != nil:
		c := v.ConfigMap
		deps["ConfigMap/"+c.Name] = true
		cm, err := w.configMap(p.Namespace, c.Name)
		if err != nil {
			if c.Optional != nil && *c.Optional {
				return out, nil
			}
			return nil, err
		}
		return out, keyPayload(cmData(cm), c.Items, c.DefaultMode, "configmap "+c.Name, c.Optional != nil && *c.Optional, out)
	case v.DownwardAPI != nil:
		return out, w.downwardPayload(p, v.DownwardAPI.Items, v.DownwardAPI.DefaultMode, out)
	case v.Projected != nil:
		def := v.Projected.DefaultMode
		for _, src := range v.Projected.Sources {
			switch {
			case src.Secret != nil:
				deps["Secret/"+src.Secret.Name] = true
				sec, err := w.secret(p.Namespace, src.Secret.Name)
				opt := src.Secret.Optional != nil && *src.Secret.Optional
				if err != nil {
					if opt {
						continue
					}
					return nil, err
				}
				if err := keyPayload(sec.Data, src.Secret.Items, def, "secret "+src.Secret.Name, opt, out); err != nil {
					return nil, err
				}
			case src.ConfigMap != nil:
				deps["ConfigMap/"+src.ConfigMap.Name] = true
				cm, err := w.configMap(p.Namespace, src.ConfigMap.Name)
				opt := src.ConfigMap.Optional != nil && *src.ConfigMap.Optional
				if err != nil {
					if opt {
						continue
					}
					return nil, err
				}
				if err := keyPayload(cmData(cm), src.ConfigMap.Items, def, "configmap "+src.ConfigMap.Name, opt, out); err != nil {
					return nil, err
				}
			case src.DownwardAPI != nil:
				if err := w.downwardPayload(p, src.DownwardAPI.Items, def, out); err != nil {
					return nil, err
				}
			case src.ServiceAccountToken != nil:
				tok, err := w.token(ctx, p, src.ServiceAccountToken)
				if err != nil {
					return nil, err
				}
				out[src.ServiceAccountToken.Path] = fileData{[]byte(tok), fileMode(nil, def, 0o600)}
			default:
				return nil, fmt.Errorf("projected volume %s: unsupported source", v.Name)
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("volume %s: unsupported type", v.Name)
}

func (w *podWorker) downwardPayload(p *corev1.Pod, items []corev1.DownwardAPIVolumeFile, def *int32, out map[string]fileData) error {
	for _, it := range items {
		var val string
		switch {
		case it.FieldRef != nil:
			v, err := fieldValue(p, w.node.ip, it.FieldRef.FieldPath)
			if err != nil {
				return err
			}
			val = v
		case it.ResourceFieldRef != nil:
			for i := range p.Spec.Containers {
				if p.Spec.Containers[i].Name == it.ResourceFieldRef.ContainerName || it.ResourceFieldRef.ContainerName == "" {
					val = resourceValue(&p.Spec.Containers[i], it.ResourceFieldRef)
					break
				}
			}
		}
		out[it.Path] = fileData{[]byte(val), fileMode(it.Mode, def, 0o644)}
	}
	return nil
}

type cachedToken struct {
	token   string
	refresh time.Time
}

// token asks the TokenRequest API for a pod-bound token, reusing it until 80% of its life.
func (w *podWorker) token(ctx context.Context, p *corev1.Pod, src *corev1.ServiceAccountTokenProjection) (string, error) {
	key := src.Audience + "|" + fmt.Sprint(ptr.Deref(src.ExpirationSeconds, 3600))
	if t, ok := w.tokens[key]; ok && time.Now().Before(t.refresh) {
		return t.token, nil
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	tr := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
		ExpirationSeconds: ptr.To(ptr.Deref(src.ExpirationSeconds, 3600)),
		BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
	}}
	if src.Audience != "" {
		tr.Spec.Audiences = []string{src.Audience}
	}
	res, err := w.k.client.CoreV1().ServiceAccounts(p.Namespace).CreateToken(ctx, sa, tr, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for serviceaccount %s/%s: %w", p.Namespace, sa, err)
	}
	life := time.Until(res.Status.ExpirationTimestamp.Time)
	w.tokens[key] = cachedToken{token: res.Status.Token, refresh: time.Now().Add(life * 8 / 10)}
	return res.Status.Token, nil
}

// syncVolumes publishes every volume of the pod; with only != nil, just those that read it.
func (w *podWorker) syncVolumes(ctx context.Context, p *corev1.Pod, only map[string]bool) error {
	var errs []string
	for i := range p.Spec.Volumes {
		v := &p.Spec.Volumes[i]
		dir := filepath.Join(w.dir, "volumes", v.Name)
		switch {
		case v.EmptyDir != nil:
			w.volDirs[v.Name] = dir
			if err := os.MkdirAll(dir, 0o777); err != nil {
				errs = append(errs, err.Error())
			}
			continue
		case v.HostPath != nil:
			w.volDirs[v.Name] = v.HostPath.Path
			if t := ptr.Deref(v.HostPath.Type, ""); t == corev1.HostPathDirectoryOrCreate {
				_ = os.MkdirAll(v.HostPath.Path, 0o755)
			}
			continue
		}
		if only != nil {
			relevant := false
			for d := range w.volDeps[v.Name] {
				if only[d] {
					relevant = true
				}
			}
			if !relevant {
				continue
			}
		}
		deps := map[string]bool{}
		payload, err := w.payloadFor(ctx, p, v, deps)
		w.volDeps[v.Name] = deps
		if err != nil {
			errs = append(errs, fmt.Sprintf("volume %q: %v", v.Name, err))
			continue
		}
		w.volDirs[v.Name] = dir
		if _, err := atomicWrite(dir, payload); err != nil {
			errs = append(errs, fmt.Sprintf("volume %q: %v", v.Name, err))
		}
	}
	if len(errs) > 0 {
		sort.Strings(errs)
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}
