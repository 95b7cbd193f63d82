// Package check runs named checks and prints one verdict line per check and
// a closing "N passed, N failed" line, the form the CI log reader counts.
package check

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"time"
)

// Skipped is returned by a check that could not be exercised; it is neither a
// pass nor a failure.
type Skipped struct{ Reason string }

func (s Skipped) Error() string { return "skipped: " + s.Reason }

// Skip returns an error that marks the running check as skipped.
func Skip(format string, args ...any) error { return Skipped{fmt.Sprintf(format, args...)} }

// Report collects verdicts.
type Report struct {
	Prefix                  string         // printed before each check name, e.g. "derpconform/"
	Filter                  *regexp.Regexp // if non-nil, only checks whose name matches run
	Passed, Failed, Skipped int
	Failures                []string
}

// New returns a report whose checks are limited to names matching filter
// (an empty filter runs everything). It exits with status 2 on a bad regexp.
func New(prefix, filter string) *Report {
	r := &Report{Prefix: prefix}
	if filter != "" {
		re, err := regexp.Compile(filter)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bad -run regexp %q: %v\n", filter, err)
			os.Exit(2)
		}
		r.Filter = re
	}
	return r
}

// Run runs fn as the check called name. fn returns a short description of what
// it measured (printed on success) or an error (printed as the failure reason).
// A panic inside fn is reported as a failure of that check.
func (r *Report) Run(name string, fn func() (string, error)) bool {
	if r.Filter != nil && !r.Filter.MatchString(name) {
		return true
	}
	start := time.Now()
	var (
		detail string
		err    error
	)
	func() {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("panic: %v", p)
			}
		}()
		detail, err = fn()
	}()
	d := time.Since(start).Round(time.Millisecond)
	var sk Skipped
	switch {
	case errors.As(err, &sk):
		r.Skipped++
		fmt.Printf("SKIP %s%s: %s (%v)\n", r.Prefix, name, sk.Reason, d)
		return true
	case err != nil:
		r.Failed++
		r.Failures = append(r.Failures, r.Prefix+name)
		fmt.Printf("FAIL %s%s: %v (%v)\n", r.Prefix, name, err, d)
		return false
	default:
		r.Passed++
		fmt.Printf("PASS %s%s: %s (%v)\n", r.Prefix, name, detail, d)
		return true
	}
}

// Finish prints the summary and exits: 0 if nothing failed, 1 otherwise.
func (r *Report) Finish() {
	if r.Skipped > 0 {
		fmt.Printf("%d skipped\n", r.Skipped)
	}
	if len(r.Failures) > 0 {
		fmt.Printf("failed checks:")
		for _, f := range r.Failures {
			fmt.Printf(" %s", f)
		}
		fmt.Println()
	}
	fmt.Printf("%d passed, %d failed\n", r.Passed, r.Failed)
	if r.Failed > 0 || r.Passed == 0 {
		os.Exit(1)
	}
	os.Exit(0)
}
