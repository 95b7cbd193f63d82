// promeval scrapes /metrics endpoints into memory with real timestamps and evaluates
// a Grafana dashboard's panel queries and a Prometheus rules file's alert expressions with
// Prometheus's own PromQL engine, at moments ("phases") a test marks while it scrapes.
//
// It is not Prometheus: the scrape loop is ours (Prometheus's text/OpenMetrics parser, its rule for
// merging target labels, honor_labels, an `up` series, staleness markers for vanished series
// and failed scrapes), service discovery and relabelling are replaced by targets given with their
// labels. Rule-file parsing and query evaluation are Prometheus's packages; the samples are kept in
// memory (memstore.go) and served to the engine through its storage interfaces.
//
//	promeval --target URL[,name=value...][,honor_labels] ... --interval 2s \
//	  --dashboard dashboard.json --rules rules.yaml --var region='.*' \
//	  [--marks FILE] [--duration 60s] [--may-be-empty "panel title"]
//
// It scrapes until SIGTERM/SIGINT or --duration, then evaluates at every line of the marks file,
// `<unix-ms> <phase> [alerts=NAME,...] [panels=data]` (without a marks file: once, at the end).
// alerts= lists the alerts whose expressions must return series at that moment (every other
// alert must return none); panels=data asks every panel query to return series, except those of
// the panels named by --may-be-empty. Prints PASS/FAIL lines; exits non-zero when a query does
// not parse or evaluate, or a check fails.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, " ") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

type mark struct {
	at         time.Time
	phase      string
	alerts     map[string]bool
	haveAlerts bool
	panelsData bool
}

type result struct{ pass, fail int }

func (r *result) check(ok bool, format string, a ...any) {
	if ok {
		r.pass++
		fmt.Printf("PASS %s\n", fmt.Sprintf(format, a...))
	} else {
		r.fail++
		fmt.Printf("FAIL %s\n", fmt.Sprintf(format, a...))
	}
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "promeval: %v\n", err)
		os.Exit(2)
	}
}

func run() error {
	var targets, varFlags, mayBeEmpty multi
	flag.Var(&targets, "target", "URL[,name=value...][,honor_labels] (repeatable)")
	flag.Var(&varFlags, "var", "Grafana variable NAME=VALUE (repeatable)")
	flag.Var(&mayBeEmpty, "may-be-empty", "title of a panel whose queries may return nothing at panels=data (repeatable)")
	interval := flag.Duration("interval", 5*time.Second, "scrape interval")
	timeout := flag.Duration("timeout", 0, "scrape timeout (default: 80% of the interval)")
	duration := flag.Duration("duration", 0, "stop scraping after this long (0: at SIGTERM/SIGINT)")
	maxDuration := flag.Duration("max-duration", 30*time.Minute, "stop scraping after this long at the latest")
	dashboard := flag.String("dashboard", "", "Grafana dashboard JSON")
	rulesFile := flag.String("rules", "", "Prometheus rules file")
	marksFile := flag.String("marks", "", "file of `<unix-ms> <phase> [alerts=...] [panels=data]` lines")
	flag.Parse()
	if len(targets) == 0 || (*dashboard == "" && *rulesFile == "") {
		return errors.New("need --target and at least one of --dashboard, --rules (see -h)")
	}
	if *timeout == 0 {
		*timeout = *interval * 4 / 5
	}
	vars := map[string]string{}
	for _, v := range varFlags {
		k, val, ok := strings.Cut(v, "=")
		if !ok {
			return fmt.Errorf("--var %q: want NAME=VALUE", v)
		}
		vars[k] = val
	}
	var ts []*target
	for _, s := range targets {
		t, err := parseTarget(s)
		if err != nil {
			return err
		}
		ts = append(ts, t)
	}

	// Read and check both files before scraping: a bad file fails at once.
	var res result
	var panels []panelQuery
	if *dashboard != "" {
		var dvars []string
		var err error
		panels, dvars, err = dashboardQueries(*dashboard)
		if err != nil {
			return err
		}
		for _, v := range dvars {
			if _, ok := vars[v]; !ok && v != "datasource" {
				return fmt.Errorf("the dashboard has variable $%s: give --var %s=VALUE", v, v)
			}
		}
	}
	p := parser.NewParser(parser.Options{})
	var rules []rulefmt.Rule
	if *rulesFile != "" {
		groups, errs := rulefmt.ParseFile(*rulesFile, false, model.UTF8Validation, p, slog.Default())
		res.check(len(errs) == 0, "%s loads as a Prometheus rules file (rulefmt: YAML, expressions, templates) %v", *rulesFile, errs)
		if len(errs) > 0 {
			return fmt.Errorf("%s: %v", *rulesFile, errs)
		}
		for _, g := range groups.Groups {
			rules = append(rules, g.Rules...)
		}
	}
	for i := range panels {
		e, err := substitute(panels[i].expr, vars, *interval, *interval)
		if err != nil {
			return fmt.Errorf("panel %q: %w", panels[i].panel, err)
		}
		if _, err := p.ParseExpr(e); err != nil {
			res.check(false, "panel %q: %s parses: %v", panels[i].panel, e, err)
		}
	}

	db := newMemStore()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	limit := *maxDuration
	if *duration > 0 && *duration < limit {
		limit = *duration
	}
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	start := time.Now()
	fmt.Fprintf(os.Stderr, "promeval: scraping %d targets every %s (timeout %s)\n", len(ts), *interval, *timeout)
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	for ctx.Err() == nil {
		now := time.Now()
		for _, t := range ts {
			// The scrape itself must not be cut by the stop signal: a half-written round
			// would leave false staleness markers.
			t.scrape(context.Background(), db, now, *timeout)
		}
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
	end := time.Now()
	fmt.Printf("scraped %d targets every %s for %s (%s .. %s):\n", len(ts), *interval,
		end.Sub(start).Round(time.Second), start.UTC().Format("15:04:05"), end.UTC().Format("15:04:05"))
	for _, t := range ts {
		errText := ""
		if t.lastErr != nil {
			errText = fmt.Sprintf(" (last error: %v)", t.lastErr)
		}
		fmt.Printf("  %s %s: %d scrapes ok, %d failed%s\n", t.url, t.labels, t.ok, t.failed, errText)
	}

	var marks []mark
	var err error
	if *marksFile != "" {
		marks, err = readMarks(*marksFile)
		if err != nil {
			return err
		}
	}
	if len(marks) == 0 {
		marks = []mark{{at: end, phase: "end"}}
	}
	ev := &evaluator{
		engine: promql.NewEngine(promql.EngineOpts{
			Logger: slog.New(slog.DiscardHandler), MaxSamples: 50_000_000, Timeout: time.Minute,
			Parser: p,
		}),
		db: db, interval: *interval, vars: vars, parser: p, res: &res,
		mayBeEmpty: map[string]bool{},
	}
	for _, t := range mayBeEmpty {
		ev.mayBeEmpty[t] = true
	}
	ev.checkLabels(panels, rules, start, end)
	for _, m := range marks {
		ev.phase(m, start, panels, rules)
	}
	fmt.Printf("promeval: %d passed, %d failed\n", res.pass, res.fail)
	if res.fail > 0 || ev.queryErrors > 0 {
		os.Exit(1)
	}
	return nil
}

func readMarks(path string) ([]mark, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mark
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if len(fields) < 2 {
			return nil, fmt.Errorf("%s: %q: want `<unix-ms> <phase> [alerts=...] [panels=data]`", path, sc.Text())
		}
		ms, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: %q: %w", path, sc.Text(), err)
		}
		m := mark{at: time.UnixMilli(ms), phase: fields[1], alerts: map[string]bool{}}
		for _, f := range fields[2:] {
			switch {
			case strings.HasPrefix(f, "alerts="):
				m.haveAlerts = true
				for _, a := range strings.Split(strings.TrimPrefix(f, "alerts="), ",") {
					if a != "" {
						m.alerts[a] = true
					}
				}
			case f == "panels=data":
				m.panelsData = true
			default:
				return nil, fmt.Errorf("%s: %q: unknown field %q", path, sc.Text(), f)
			}
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].at.Before(out[j].at) })
	return out, sc.Err()
}

func labelString(l labels.Labels) string {
	l = l.DropMetricName()
	if l.IsEmpty() {
		return "{}"
	}
	return l.String()
}
