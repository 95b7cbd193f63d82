package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/textparse"
	"github.com/prometheus/prometheus/model/value"
)

// A scrape target as a ServiceMonitor or PodMonitor of the Prometheus Operator makes it: the URL,
// the target labels it attaches (job, instance, namespace, pod, ...) and honor_labels.
type target struct {
	url    string
	labels labels.Labels
	honor  bool
	// Series of the last successful scrape (by their string form): those missing from the next
	// scrape, or all of them when a scrape fails, get a staleness marker, as Prometheus writes.
	last map[string]labels.Labels
	// Scrapes that succeeded / failed, and the last error.
	ok, failed int
	lastErr    error
}

// parseTarget reads `URL[,name=value...][,honor_labels]`.
func parseTarget(spec string) (*target, error) {
	parts := strings.Split(spec, ",")
	t := &target{url: parts[0], last: map[string]labels.Labels{}}
	if !strings.HasPrefix(t.url, "http://") && !strings.HasPrefix(t.url, "https://") {
		return nil, fmt.Errorf("target %q: the first field must be an http(s) URL", spec)
	}
	b := labels.NewBuilder(labels.EmptyLabels())
	host := strings.SplitN(strings.SplitN(t.url, "://", 2)[1], "/", 2)[0]
	b.Set("instance", host)
	b.Set("job", "promeval")
	for _, p := range parts[1:] {
		if p == "honor_labels" {
			t.honor = true
			continue
		}
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("target %q: %q is neither name=value nor honor_labels", spec, p)
		}
		b.Set(k, v)
	}
	t.labels = b.Labels()
	return t, nil
}

// sampleLabels merges the target's labels into a scraped series' labels the way Prometheus's
// scrape loop does: with honor_labels the scraped value wins; without it the target's wins and
// the scraped one is kept as exported_<name>.
func (t *target) sampleLabels(scraped labels.Labels) labels.Labels {
	b := labels.NewBuilder(scraped)
	t.labels.Range(func(l labels.Label) {
		have := scraped.Get(l.Name)
		switch {
		case t.honor && have != "":
		case t.honor:
			b.Set(l.Name, l.Value)
		default:
			if have != "" {
				name := l.Name
				for {
					name = "exported_" + name
					if b.Get(name) == "" {
						b.Set(name, have)
						break
					}
				}
			}
			b.Set(l.Name, l.Value)
		}
	})
	return b.Labels()
}

// The Accept header of Prometheus 3's default scrape protocols.
const accept = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.1"

// scrape fetches the target once and appends its samples at `now` (or their own timestamps), an
// `up` sample, and staleness markers for series that went away.
func (t *target) scrape(ctx context.Context, db *memStore, now time.Time, timeout time.Duration) {
	ms := now.UnixMilli()
	samples, err := t.fetch(ctx, timeout)
	seen := map[string]labels.Labels{}
	up := 1.0
	if err != nil {
		up = 0
		t.failed++
		t.lastErr = err
	} else {
		t.ok++
		for _, s := range samples {
			lset := t.sampleLabels(s.lset)
			ts := ms
			if s.ts != nil {
				ts = *s.ts
			}
			if !db.add(lset, ts, s.v) {
				// Prometheus drops out-of-order and duplicate samples too.
				t.lastErr = fmt.Errorf("%s: a sample not newer than the last, dropped", lset)
				continue
			}
			seen[lset.String()] = lset
		}
	}
	for k, l := range t.last {
		if _, ok := seen[k]; !ok {
			db.add(l, ms, math.Float64frombits(value.StaleNaN))
		}
	}
	t.last = seen
	upLabels := labels.NewBuilder(t.labels)
	upLabels.Set(labels.MetricName, "up")
	db.add(upLabels.Labels(), ms, up)
}

type sample struct {
	lset labels.Labels
	ts   *int64
	v    float64
}

func (t *target) fetch(ctx context.Context, timeout time.Duration) ([]sample, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", accept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: HTTP %s", t.url, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	p, err := textparse.New(body, resp.Header.Get("Content-Type"), labels.NewSymbolTable(),
		textparse.ParserOptions{FallbackContentType: "text/plain"})
	if p == nil {
		return nil, fmt.Errorf("%s: no parser for Content-Type %q: %w", t.url, resp.Header.Get("Content-Type"), err)
	}
	var out []sample
	for {
		e, err := p.Next()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: parsing: %w", t.url, err)
		}
		switch e {
		case textparse.EntrySeries:
			_, ts, v := p.Series()
			var l labels.Labels
			p.Labels(&l)
			var tsCopy *int64
			if ts != nil {
				x := *ts
				tsCopy = &x
			}
			out = append(out, sample{lset: l, ts: tsCopy, v: v})
		case textparse.EntryHistogram:
			return nil, fmt.Errorf("%s: native histograms are not handled here", t.url)
		}
	}
}
