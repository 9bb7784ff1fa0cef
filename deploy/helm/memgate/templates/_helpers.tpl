{{- define "memgate.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "memgate.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "memgate.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "memgate.keysSecret" -}}
{{- .Values.tenantKeys.existingSecret | default (printf "%s-tenant-keys" (include "memgate.fullname" .)) -}}
{{- end -}}

{{/* The gateway config: the values' config, shared_state when redis is enabled. */}}
{{- define "memgate.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $server := get $cfg "server" | default dict -}}
{{- $_ := set $server "host" "0.0.0.0" -}}
{{- $_ := set $server "port" (int .Values.port) -}}
{{- $_ := set $server "shutdown_grace_s" .Values.shutdownGraceSeconds -}}
{{- $_ := set $cfg "server" $server -}}
{{- if .Values.redis.enabled -}}
{{- $_ := set $cfg "shared_state" (dict "redis_url_env" "MEMGATE_REDIS_URL" "key_prefix" .Values.redis.keyPrefix "lease_ttl_s" .Values.redis.leaseTtlSeconds "on_unavailable" .Values.redis.onUnavailable) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
