{{/* Name of the DaemonSet and ServiceAccount: "ztunnel" unless overridden. */}}
{{- define "ringtun.name" -}}
{{- .Values.resourceName | default "ztunnel" -}}
{{- end -}}

{{/* Name of the local-config ConfigMap. */}}
{{- define "ringtun.configName" -}}
{{- .Values.localConfig.name | default "ringtun-config" -}}
{{- end -}}

{{/* Image reference: repository:tag, tag defaulting to the chart's appVersion. */}}
{{- define "ringtun.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{/* istiod address for CA and XDS: istiod[-<revision>].<namespace>.svc:15012 */}}
{{- define "ringtun.istiod" -}}
{{- $rev := ternary "" (printf "-%s" .Values.revision) (eq .Values.revision "") -}}
{{- printf "https://istiod%s.%s.svc:15012" $rev .Values.xds.istioNamespace -}}
{{- end -}}

{{/* Labels of every top-level resource. The plain manifest (deploy/kubernetes) carries the same
     ones minus Helm's own (helm.sh/chart, managed-by, instance, version). */}}
{{- define "ringtun.labels" -}}
app: ztunnel
app.kubernetes.io/name: ztunnel
app.kubernetes.io/part-of: istio
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Annotations of every top-level resource (istio.io/rev with a revision). */}}
{{- define "ringtun.annotations" -}}
{{- $annos := deepCopy .Values.annotations -}}
{{- if .Values.revision -}}
{{- $_ := set $annos "istio.io/rev" .Values.revision -}}
{{- end -}}
{{- if $annos -}}
{{ toYaml $annos }}
{{- end -}}
{{- end -}}
