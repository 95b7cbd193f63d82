package main

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/storage"
	"github.com/prometheus/prometheus/util/annotations"
)

type evaluator struct {
	engine      *promql.Engine
	db          storage.Queryable
	interval    time.Duration
	vars        map[string]string
	parser      parser.Parser
	res         *result
	mayBeEmpty  map[string]bool
	queryErrors int
}

// instant evaluates expr at t; on an error it counts it and prints a FAIL line.
func (ev *evaluator) instant(where, expr string, t time.Time) (promql.Vector, annotations.Annotations, bool) {
	q, err := ev.engine.NewInstantQuery(context.Background(), ev.db, nil, expr, t)
	if err != nil {
		ev.queryErrors++
		ev.res.check(false, "%s: %s: %v", where, expr, err)
		return nil, nil, false
	}
	defer q.Close()
	r := q.Exec(context.Background())
	if r.Err != nil {
		ev.queryErrors++
		ev.res.check(false, "%s: %s evaluates: %v", where, expr, r.Err)
		return nil, nil, false
	}
	switch v := r.Value.(type) {
	case promql.Vector:
		return v, r.Warnings, true
	case promql.Scalar:
		return promql.Vector{{F: v.V, T: v.T}}, r.Warnings, true
	default:
		ev.queryErrors++
		ev.res.check(false, "%s: %s returns a %s, not a vector or scalar", where, expr, r.Value.Type())
		return nil, nil, false
	}
}

// heldFor says how long before t, evaluated every scrape interval within `within`, the series
// of expr with labels l has been returned without a gap (what an alert's `for:` waits for).
func (ev *evaluator) heldFor(expr string, l labels.Labels, t time.Time, within time.Duration) time.Duration {
	q, err := ev.engine.NewRangeQuery(context.Background(), ev.db, nil, expr, t.Add(-within), t, ev.interval)
	if err != nil {
		return 0
	}
	defer q.Close()
	r := q.Exec(context.Background())
	m, err := r.Matrix()
	if err != nil {
		return 0
	}
	for _, s := range m {
		if !labels.Equal(s.Metric, l) || len(s.Floats) == 0 {
			continue
		}
		pts := s.Floats
		last := pts[len(pts)-1].T
		if last != t.UnixMilli() {
			return 0
		}
		first := last
		for i := len(pts) - 2; i >= 0 && first-pts[i].T == ev.interval.Milliseconds(); i-- {
			first = pts[i].T
		}
		return time.Duration(last-first) * time.Millisecond
	}
	return 0
}

func fmtValue(v float64) string {
	return strconv.FormatFloat(v, 'g', 6, 64)
}

func (ev *evaluator) phase(m mark, start time.Time, panels []panelQuery, rules []rulefmt.Rule) {
	fmt.Printf("\n== phase %s at %s (%s after the first scrape)\n", m.phase,
		m.at.UTC().Format("15:04:05"), m.at.Sub(start).Round(time.Second))
	empty, withData := []string{}, 0
	lastPanel := ""
	for _, pq := range panels {
		expr, err := substitute(pq.expr, ev.vars, ev.interval, m.at.Sub(start))
		if err != nil {
			ev.queryErrors++
			ev.res.check(false, "panel %q: %v", pq.panel, err)
			continue
		}
		if pq.panel != lastPanel {
			fmt.Printf("panel %q\n", pq.panel)
			lastPanel = pq.panel
		}
		fmt.Printf("  %s\n", expr)
		v, warns, ok := ev.instant(fmt.Sprintf("panel %q", pq.panel), expr, m.at)
		if !ok {
			continue
		}
		ws, infos := warns.AsStrings(expr, 0, 0)
		for _, w := range append(ws, infos...) {
			fmt.Printf("    (engine warning: %s)\n", w)
		}
		if len(v) == 0 {
			fmt.Printf("    (no series)\n")
			if !ev.mayBeEmpty[pq.panel] {
				empty = append(empty, fmt.Sprintf("%q: %s", pq.panel, expr))
			}
			continue
		}
		withData++
		sort.Slice(v, func(i, j int) bool { return labels.Compare(v[i].Metric, v[j].Metric) < 0 })
		for _, s := range v {
			name := legend(pq.legend, s.Metric.Get, labelString(s.Metric))
			fmt.Printf("    %-44s %s\n", name, fmtValue(s.F))
		}
	}
	if m.panelsData && len(panels) > 0 {
		ev.res.check(len(empty) == 0, "%s: every panel query returns data (%d did; allowed to be empty: %s)%s",
			m.phase, withData, mapKeys(ev.mayBeEmpty), listSuffix("; empty: ", empty))
	}

	firing := map[string]bool{}
	names := map[string]bool{}
	for _, r := range rules {
		if r.Alert == "" {
			continue
		}
		names[r.Alert] = true
		where := fmt.Sprintf("alert %s", r.Alert)
		v, _, ok := ev.instant(where, r.Expr, m.at)
		if !ok {
			continue
		}
		state := "inactive"
		if len(v) > 0 {
			firing[r.Alert] = true
			state = "firing"
			if f := time.Duration(r.For); f > 0 {
				held := time.Duration(0)
				for _, s := range v {
					held = max(held, ev.heldFor(r.Expr, s.Metric, m.at, f))
				}
				state = fmt.Sprintf("returned for %s", held.Round(time.Second))
				if held >= f {
					state += fmt.Sprintf(" >= for: %s: firing", time.Duration(r.For))
				} else {
					state += fmt.Sprintf(" < for: %s: pending", time.Duration(r.For))
				}
			}
		}
		fmt.Printf("alert %s: %d series, %s\n", r.Alert, len(v), state)
		for _, s := range v {
			fmt.Printf("    %s %s\n", labelString(s.Metric), fmtValue(s.F))
		}
	}
	if m.haveAlerts {
		for a := range m.alerts {
			ev.res.check(names[a], "%s: alert %s named by the mark exists in the rules", m.phase, a)
		}
		for _, r := range rules {
			if r.Alert == "" {
				continue
			}
			if m.alerts[r.Alert] {
				ev.res.check(firing[r.Alert], "%s: %s's expression returns series", m.phase, r.Alert)
			} else {
				ev.res.check(!firing[r.Alert], "%s: %s's expression returns nothing", m.phase, r.Alert)
			}
		}
	}
}

// checkLabels: every label an expression (or a panel's legend) matches, groups or joins on must
// be carried by some series that the expression's selectors select over the whole scrape, and
// each selector must select something (unless its panel may be empty).
func (ev *evaluator) checkLabels(panels []panelQuery, rules []rulefmt.Rule, start, end time.Time) {
	type item struct{ where, expr, legend string }
	var items []item
	for _, pq := range panels {
		e, err := substitute(pq.expr, ev.vars, ev.interval, end.Sub(start))
		if err == nil {
			items = append(items, item{fmt.Sprintf("panel %q", pq.panel), e, pq.legend})
		}
	}
	for _, r := range rules {
		if r.Alert != "" {
			items = append(items, item{"alert " + r.Alert, r.Expr, ""})
		}
	}
	q, err := ev.db.Querier(start.UnixMilli(), end.UnixMilli())
	if err != nil {
		ev.res.check(false, "opening a querier: %v", err)
		return
	}
	defer q.Close()
	bad, checked := 0, 0
	for _, it := range items {
		ast, err := ev.parser.ParseExpr(it.expr)
		if err != nil {
			continue // reported by the phase evaluation
		}
		used := map[string]bool{}
		have := map[string]bool{}
		var selectors []*parser.VectorSelector
		parser.Inspect(ast, func(n parser.Node, _ []parser.Node) error {
			switch x := n.(type) {
			case *parser.VectorSelector:
				selectors = append(selectors, x)
				for _, lm := range x.LabelMatchers {
					if lm.Name != labels.MetricName {
						used[lm.Name] = true
					}
				}
			case *parser.AggregateExpr:
				if !x.Without {
					for _, g := range x.Grouping {
						used[g] = true
					}
				}
			case *parser.BinaryExpr:
				if x.VectorMatching != nil {
					for _, l := range x.VectorMatching.MatchingLabels {
						used[l] = true
					}
					for _, l := range x.VectorMatching.Include {
						used[l] = true
					}
				}
			}
			return nil
		})
		for _, g := range legendRef.FindAllStringSubmatch(it.legend, -1) {
			used[g[1]] = true
		}
		for _, s := range selectors {
			ss := q.Select(context.Background(), false, nil, s.LabelMatchers...)
			n := 0
			for ss.Next() {
				n++
				ss.At().Labels().Range(func(l labels.Label) { have[l.Name] = true })
			}
			if ss.Err() != nil {
				ev.res.check(false, "%s: selecting %s: %v", it.where, s, ss.Err())
			}
			panel := strings.TrimSuffix(strings.TrimPrefix(it.where, "panel \""), "\"")
			if n == 0 && !ev.mayBeEmpty[panel] && !strings.HasPrefix(it.expr, "absent(") {
				bad++
				ev.res.check(false, "%s: %s selects no series in the whole scrape", it.where, s)
			}
		}
		for l := range used {
			checked++
			if !have[l] && len(have) > 0 {
				bad++
				ev.res.check(false, "%s: label %q is used but no selected series carries it (%s)", it.where, l, it.expr)
			}
		}
	}
	ev.res.check(bad == 0, "labels: %d label uses in %d expressions, each carried by the series selected", checked, len(items))
}

func mapKeys(m map[string]bool) string {
	var out []string
	for k := range m {
		out = append(out, strconv.Quote(k))
	}
	sort.Strings(out)
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

func listSuffix(prefix string, l []string) string {
	if len(l) == 0 {
		return ""
	}
	return prefix + strings.Join(l, "; ")
}
