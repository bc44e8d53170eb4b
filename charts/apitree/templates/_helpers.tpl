{{/* The name of every object of the release. */}}
{{- define "apitree.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "apitree" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-apitree" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "apitree.selectorLabels" -}}
app.kubernetes.io/name: apitree-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "apitree.labels" -}}
{{ include "apitree.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: apitree
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The operator image; the tag defaults to the chart's appVersion. */}}
{{- define "apitree.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The scheme of the operator's port. */}}
{{- define "apitree.scheme" -}}
{{ if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end -}}

{{/* The Secret holding the operator's certificate: the given one, or the Certificate's. */}}
{{- define "apitree.tlsSecret" -}}
{{ .Values.tls.existingSecret | default (printf "%s-tls" (include "apitree.fullname" .)) }}
{{- end -}}
