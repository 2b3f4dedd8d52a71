{{- define "kloudmeter.name" -}}kloudmeter{{- end -}}

{{- define "kloudmeter.fullname" -}}
{{- if eq .Release.Name "kloudmeter" -}}kloudmeter{{- else -}}{{ printf "%s-kloudmeter" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "kloudmeter.labels" -}}
app.kubernetes.io/name: kloudmeter
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kloudmeter.selector" -}}
app.kubernetes.io/name: kloudmeter
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kloudmeter.natsName" -}}{{ include "kloudmeter.fullname" . }}-nats{{- end -}}

{{- define "kloudmeter.natsClustered" -}}
{{- if and .Values.nats.embedded.enabled .Values.nats.embedded.cluster.enabled -}}true{{- end -}}
{{- end -}}

{{/* The embedded cluster's servers each have a stable name under a headless Service. */}}
{{- define "kloudmeter.natsPeers" -}}{{ include "kloudmeter.natsName" . }}-cluster{{- end -}}

{{- define "kloudmeter.natsUrl" -}}
{{- if include "kloudmeter.natsClustered" . -}}
{{- $name := include "kloudmeter.natsName" . -}}
{{- $peers := include "kloudmeter.natsPeers" . -}}
{{- range $i := until 3 -}}
{{ if $i }},{{ end }}nats://{{ $name }}-{{ $i }}.{{ $peers }}.{{ $.Release.Namespace }}.svc:4222
{{- end -}}
{{- else if .Values.nats.embedded.enabled -}}
nats://{{ include "kloudmeter.natsName" . }}.{{ .Release.Namespace }}.svc:4222
{{- else -}}
{{- required "nats.url is required when nats.embedded.enabled is false" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{- define "kloudmeter.natsReplicas" -}}
{{- if .Values.nats.replicas -}}{{ .Values.nats.replicas }}
{{- else if include "kloudmeter.natsClustered" . -}}3
{{- else -}}1
{{- end -}}
{{- end -}}

{{- define "kloudmeter.tokenSecret" -}}
{{- if .Values.apiToken.existingSecret -}}{{ .Values.apiToken.existingSecret }}{{- else -}}{{ include "kloudmeter.fullname" . }}-api-token{{- end -}}
{{- end -}}
