{{/* Chart name (nameOverride wins). */}}
{{- define "derp-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, plus the chart name unless it is already in it. */}}
{{- define "derp-fleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "derp-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "derp-fleet.labels" -}}
helm.sh/chart: {{ include "derp-fleet.chart" . }}
{{ include "derp-fleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: derp-fleet
{{- end }}

{{/* Selector labels of the operator pods (immutable in the Deployment: never add to these). */}}
{{- define "derp-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "derp-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "derp-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "derp-fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "derp-fleet.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "derp-fleet.operatorImage" -}}
{{- include "derp-fleet.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "derp-fleet.derperImage" -}}
{{- include "derp-fleet.imageRef" (dict "image" .Values.derperImage "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* The map Service's in-cluster URL, for Headscale's derp.urls. */}}
{{- define "derp-fleet.mapURL" -}}
{{- $port := int .Values.service.port }}
{{- if eq $port 80 }}
{{- printf "http://%s.%s.svc.cluster.local/derpmap.json" (include "derp-fleet.fullname" .) .Release.Namespace }}
{{- else }}
{{- printf "http://%s.%s.svc.cluster.local:%d/derpmap.json" (include "derp-fleet.fullname" .) .Release.Namespace $port }}
{{- end }}
{{- end }}

{{/*
The permissions the operator needs wherever DerpRegions live (all namespaces in a ClusterRole,
or operator.watchNamespace in a Role). Each rule names the code that needs it.
*/}}
{{- define "derp-fleet.regionRules" -}}
# Watch caches of DerpRegions (run.rs: reflector; list+watch, no get).
- apiGroups: ["derpfleet.io"]
  resources: ["derpregions"]
  verbs: ["list", "watch"]
# Conditions, nodes and published names (controller.rs: server-side apply of status).
- apiGroups: ["derpfleet.io"]
  resources: ["derpregions/status"]
  verbs: ["patch"]
# Owned objects carry ownerReferences with blockOwnerDeletion=true; with the
# OwnerReferencesPermissionEnforcement admission plugin that needs update on the owner's
# finalizers subresource (nothing else writes finalizers).
- apiGroups: ["derpfleet.io"]
  resources: ["derpregions/finalizers"]
  verbs: ["update"]
# Server-side apply is a PATCH, and the API server also asks for create when the object does
# not exist yet: every applied kind has create and patch (never update; the garbage collector
# removes owned objects with their DerpRegion). delete only where the operator prunes an object
# a region stopped needing (mesh turned off, TLS mode changed; controller.rs prune, uid
# precondition, owned objects only).
# The derpers (applied; watched by label).
- apiGroups: ["apps"]
  resources: ["daemonsets"]
  verbs: ["list", "watch", "create", "patch"]
# Self-signed certificates and mesh keys (applied); the region's own tls.secretName and a
# just-created Secret not yet in the cache are read with get.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Mesh peer lists (applied; watched by label).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Derper readiness, for the map (read only).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# cert-manager Certificates for regions with tls.issuerRef (applied; watched by label).
- apiGroups: ["cert-manager.io"]
  resources: ["certificates"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Events on DerpRegions (kube-runtime's Recorder creates, then patches repeats into a series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
