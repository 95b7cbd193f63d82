package main

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"
)

type panelQuery struct {
	panel  string
	expr   string // as written in the dashboard
	legend string
	hidden bool
}

// dashboardQueries reads every panel target (rows' nested panels too) of a Grafana dashboard.
func dashboardQueries(path string) ([]panelQuery, []string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	var d struct {
		Panels     []json.RawMessage `json:"panels"`
		Templating struct {
			List []struct {
				Name string `json:"name"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	var vars []string
	for _, v := range d.Templating.List {
		vars = append(vars, v.Name)
	}
	var out []panelQuery
	var walk func(ps []json.RawMessage) error
	walk = func(ps []json.RawMessage) error {
		for _, r := range ps {
			var p struct {
				Title   string            `json:"title"`
				Panels  []json.RawMessage `json:"panels"`
				Targets []struct {
					Expr         string `json:"expr"`
					LegendFormat string `json:"legendFormat"`
					Hide         bool   `json:"hide"`
				} `json:"targets"`
			}
			if err := json.Unmarshal(r, &p); err != nil {
				return fmt.Errorf("%s: a panel: %w", path, err)
			}
			for _, t := range p.Targets {
				if t.Expr != "" {
					out = append(out, panelQuery{p.Title, t.Expr, t.LegendFormat, t.Hide})
				}
			}
			if err := walk(p.Panels); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(d.Panels); err != nil {
		return nil, nil, err
	}
	return out, vars, nil
}

// $name, ${name}, ${name:format} and [[name]], as Grafana writes variable references.
var varRef = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]`)

// substitute replaces Grafana variables by their values: the dashboard's own variables from
// `vars` (what a user picks), Grafana's built-in interval variables from the scrape interval
// and the query's range. An unknown variable is an error, not an empty string.
func substitute(expr string, vars map[string]string, scrape, rng time.Duration) (string, error) {
	builtin := map[string]string{
		// Grafana: max($__interval + scrape interval, 4 * scrape interval); for one instant
		// $__interval is taken as one scrape interval, so 4 scrape intervals.
		"__rate_interval": promDuration(4 * scrape),
		"__interval":      promDuration(scrape),
		"__interval_ms":   fmt.Sprint(scrape.Milliseconds()),
		"__range":         promDuration(rng),
		"__range_s":       fmt.Sprint(int64(rng.Seconds())),
		"__range_ms":      fmt.Sprint(rng.Milliseconds()),
	}
	var missing []string
	out := varRef.ReplaceAllStringFunc(expr, func(m string) string {
		g := varRef.FindStringSubmatch(m)
		name := g[1] + g[2] + g[3]
		if v, ok := vars[name]; ok {
			return v
		}
		if v, ok := builtin[name]; ok {
			return v
		}
		missing = append(missing, name)
		return m
	})
	if len(missing) > 0 {
		return "", fmt.Errorf("no value for Grafana variable(s) %s (give --var NAME=VALUE)", strings.Join(missing, ", "))
	}
	return out, nil
}

func promDuration(d time.Duration) string {
	if d%time.Second == 0 {
		return fmt.Sprintf("%ds", int64(d.Seconds()))
	}
	return fmt.Sprintf("%dms", d.Milliseconds())
}

var legendRef = regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`)

// legend renders a Grafana legendFormat for a series' labels ("" -> the label set itself).
func legend(format string, get func(string) string, fallback string) string {
	if format == "" || format == "__auto" {
		return fallback
	}
	return legendRef.ReplaceAllStringFunc(format, func(m string) string {
		return get(legendRef.FindStringSubmatch(m)[1])
	})
}
