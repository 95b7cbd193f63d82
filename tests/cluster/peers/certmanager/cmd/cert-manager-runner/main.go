// Command cert-manager-runner runs cert-manager's real controllers (from the
// published github.com/cert-manager/cert-manager module) for the test rig.
//
// The stock controller binary lives in a nested module (cmd/controller, module
// path .../controller-binary) that the module proxy cannot serve, so this
// small main wires the public pkg/controller registry the same way: build a
// ContextFactory, construct each enabled controller, start the shared
// informer factories. Only the non-ACME issuers are enabled (SelfSigned, CA);
// no webhook, no cainjector, no metrics or health listeners, no leader
// election.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/cert-manager/cert-manager/pkg/controller"
	logf "github.com/cert-manager/cert-manager/pkg/logs"

	// Controllers register themselves in init().
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/issuing"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/keymanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/readiness"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/requestmanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/revisionmanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/trigger"
	_ "github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	_ "github.com/cert-manager/cert-manager/pkg/controller/issuers"
	// Issuer implementations used by the issuers/clusterissuers controllers.
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned"
)

var defaultControllers = []string{
	"issuers",
	"clusterissuers",
	"certificaterequests-approver",
	"certificaterequests-issuer-selfsigned",
	"certificaterequests-issuer-ca",
	"certificates-trigger",
	"certificates-issuing",
	"certificates-key-manager",
	"certificates-request-manager",
	"certificates-readiness",
	"certificates-revision-manager",
}

func main() {
	klog.InitFlags(nil)
	kubeconfig := flag.String("kubeconfig", "", "path to a kubeconfig (required)")
	clusterNS := flag.String("cluster-resource-namespace", "cert-manager", "namespace for ClusterIssuer secrets")
	controllers := flag.String("controllers", strings.Join(defaultControllers, ","), "comma-separated controller names")
	ownerRef := flag.Bool("enable-certificate-owner-ref", false, "set the Certificate as owner of its Secret")
	workers := flag.Int("workers", 5, "workers per controller")
	flag.Parse()
	if *kubeconfig == "" {
		fmt.Fprintln(os.Stderr, "cert-manager-runner: --kubeconfig is required")
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx = logf.NewContext(ctx, logf.Log, "controller")

	factory, err := controller.NewContextFactory(ctx, controller.ContextOptions{
		Kubeconfig:         *kubeconfig,
		KubernetesAPIQPS:   50,
		KubernetesAPIBurst: 100,
		IssuerOptions: controller.IssuerOptions{
			ClusterResourceNamespace: *clusterNS,
		},
		CertificateOptions: controller.CertificateOptions{
			EnableOwnerRef: *ownerRef,
			CopiedAnnotationPrefixes: []string{
				"*", "-kubectl.kubernetes.io/", "-fluxcd.io/", "-argocd.argoproj.io/",
			},
			CertificateRequestMinimumBackoffDuration: time.Hour,
			CertificateRequestMaximumBackoffDuration: 32 * time.Hour,
		},
	})
	if err != nil {
		klog.Fatalf("building controller context factory: %v", err)
	}

	known := controller.Known()
	var names []string
	for _, n := range strings.Split(*controllers, ",") {
		if n = strings.TrimSpace(n); n != "" {
			if _, ok := known[n]; !ok {
				var all []string
				for k := range known {
					all = append(all, k)
				}
				sort.Strings(all)
				klog.Fatalf("unknown controller %q (known: %s)", n, strings.Join(all, ","))
			}
			names = append(names, n)
		}
	}

	var wg sync.WaitGroup
	for _, n := range names {
		iface, err := known[n](factory)
		if err != nil {
			klog.Fatalf("constructing controller %s: %v", n, err)
		}
		wg.Add(1)
		go func(n string, c controller.Interface) {
			defer wg.Done()
			klog.Infof("starting controller %s", n)
			if err := c.Run(*workers, ctx); err != nil {
				klog.Errorf("controller %s: %v", n, err)
				stop()
			}
		}(n, iface)
	}

	// All Contexts built from the factory share its informer factories.
	cctx, err := factory.Build()
	if err != nil {
		klog.Fatalf("building context: %v", err)
	}
	cctx.SharedInformerFactory.Start(ctx.Done())
	cctx.KubeSharedInformerFactory.Start(ctx.Done())
	cctx.HTTP01ResourceMetadataInformersFactory.Start(ctx.Done())
	klog.Infof("cert-manager-runner: %d controllers running", len(names))

	<-ctx.Done()
	wg.Wait()
	klog.Info("cert-manager-runner: stopped")
}
