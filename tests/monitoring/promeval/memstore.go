package main

import (
	"context"
	"sort"
	"sync"

	"github.com/prometheus/prometheus/model/histogram"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/tsdb/chunkenc"
	"github.com/prometheus/prometheus/tsdb/chunks"
	"github.com/prometheus/prometheus/util/annotations"
)

// memStore keeps float samples per series in memory and serves them to the PromQL engine as a
// storage.Queryable. Prometheus's TSDB package would do, but it pulls in its config package and
// with it the cloud SDKs of remote write (hundreds of packages to compile); a test fleet's few
// thousand series over minutes fit in a map.
type memStore struct {
	mu     sync.Mutex
	series map[string]*memSeries
}

type memSeries struct {
	lset    labels.Labels
	samples []chunks.Sample
}

func newMemStore() *memStore { return &memStore{series: map[string]*memSeries{}} }

// add appends a sample; like the TSDB it drops one that is not newer than the series' last.
func (m *memStore) add(l labels.Labels, t int64, v float64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := l.String()
	s, ok := m.series[k]
	if !ok {
		s = &memSeries{lset: l}
		m.series[k] = s
	}
	if n := len(s.samples); n > 0 && s.samples[n-1].T() >= t {
		return false
	}
	s.samples = append(s.samples, fSample{t, v})
	return true
}

func (m *memStore) Querier(_, _ int64) (storage.Querier, error) { return m, nil }

func (m *memStore) Select(_ context.Context, _ bool, _ *storage.SelectHints, ms ...*labels.Matcher) storage.SeriesSet {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []storage.Series
	for _, s := range m.series {
		if matches(s.lset, ms) {
			out = append(out, storage.NewListSeries(s.lset, append([]chunks.Sample(nil), s.samples...)))
		}
	}
	// The engine merges and compares series in label order.
	sort.Slice(out, func(i, j int) bool { return labels.Compare(out[i].Labels(), out[j].Labels()) < 0 })
	return &listSet{series: out, i: -1}
}

func matches(l labels.Labels, ms []*labels.Matcher) bool {
	for _, m := range ms {
		if !m.Matches(l.Get(m.Name)) {
			return false
		}
	}
	return true
}

func (m *memStore) LabelValues(_ context.Context, name string, _ *storage.LabelHints, ms ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := map[string]bool{}
	for _, s := range m.series {
		if v := s.lset.Get(name); v != "" && matches(s.lset, ms) {
			seen[v] = true
		}
	}
	return sortedKeys(seen), nil, nil
}

func (m *memStore) LabelNames(_ context.Context, _ *storage.LabelHints, ms ...*labels.Matcher) ([]string, annotations.Annotations, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := map[string]bool{}
	for _, s := range m.series {
		if matches(s.lset, ms) {
			s.lset.Range(func(l labels.Label) { seen[l.Name] = true })
		}
	}
	return sortedKeys(seen), nil, nil
}

func (m *memStore) Close() error { return nil }

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

type listSet struct {
	series []storage.Series
	i      int
}

func (l *listSet) Next() bool                        { l.i++; return l.i < len(l.series) }
func (l *listSet) At() storage.Series                { return l.series[l.i] }
func (l *listSet) Err() error                        { return nil }
func (l *listSet) Warnings() annotations.Annotations { return nil }

// fSample is a float sample as chunks.Sample.
type fSample struct {
	t int64
	f float64
}

func (s fSample) T() int64                      { return s.t }
func (s fSample) ST() int64                     { return 0 }
func (s fSample) F() float64                    { return s.f }
func (s fSample) H() *histogram.Histogram       { return nil }
func (s fSample) FH() *histogram.FloatHistogram { return nil }
func (s fSample) Type() chunkenc.ValueType      { return chunkenc.ValFloat }
func (s fSample) Copy() chunks.Sample           { return s }
