using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Encodings.Web;

namespace KernelLM.Runtime.Signals;

/// <summary>
/// The HTML form of an <see cref="UncertaintyReport"/>: one self-contained page (inline CSS and JS, nothing fetched).
/// The sequence-level figures come first, then the prompt and the generated text, each token a span coloured by
/// its probability or, switched by radio buttons, by the entropy of its distribution. The page is rendered here:
/// every token span carries its numbers and top alternatives in a title attribute, so it reads without JS. The
/// script only switches the colouring and replaces the native tooltip by a richer one (hover or keyboard focus)
/// built from the report's JSON, embedded in a script block of type application/json.
///
/// Safety: all text goes through <see cref="WebUtility.HtmlEncode"/> (text and double-quoted attributes); the
/// embedded JSON is written with <see cref="JavaScriptEncoder.Default"/>, which escapes &lt; &gt; &amp; ' so the
/// block cannot be closed early; the script inserts data only through textContent.
/// </summary>
public static class UncertaintyReportHtml
{
    public static string Render(UncertaintyReport report)
    {
        using var writer = new StringWriter(CultureInfo.InvariantCulture);
        Write(report, writer);
        return writer.ToString();
    }

    public static void Write(UncertaintyReport report, TextWriter writer)
    {
        ArgumentNullException.ThrowIfNull(report);
        ArgumentNullException.ThrowIfNull(writer);
        var summary = report.Summary;
        double entropyScale = EntropyScale(report);
        writer.Write("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        writer.Write("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        writer.Write($"<title>Uncertainty report: {Encode(report.Model)}</title>\n<style>{Style}</style>\n</head>\n<body>\n");

        writer.Write("<header>\n<h1>Uncertainty report</h1>\n");
        writer.Write($"<p class=\"meta\">model <b>{Encode(report.Model)}</b> · {summary.TokenCount} generated tokens · finished: <b>{UncertaintyReport.FinishReasonName(report.FinishReason)}</b></p>\n");
        writer.Write("<dl class=\"figures\">\n");
        Figure(writer, "geometric mean p", Number(summary.GeometricMeanProbability, "F4"),
            $"perplexity {Number(1 / summary.GeometricMeanProbability, "F3")}");
        Figure(writer, "arithmetic mean p", Number(summary.ArithmeticMeanProbability, "F4"), "mean of the chosen tokens' p");
        Figure(writer, "mean entropy", Number(summary.MeanEntropy, "F3") + " nats", "of the next-token distributions");
        Figure(writer, "mean kurtosis", Number(summary.MeanKurtosis, "F1"), "excess kurtosis of the probabilities");
        writer.Write("</dl>\n</header>\n<main>\n");

        writer.Write("<div class=\"controls\">\n<fieldset id=\"mode\"><legend>colour by</legend>");
        writer.Write("<label><input type=\"radio\" name=\"mode\" value=\"prob\" checked> probability</label>");
        writer.Write("<label><input type=\"radio\" name=\"mode\" value=\"entropy\"> entropy</label></fieldset>\n");
        writer.Write("<div class=\"legend\" id=\"legend-prob\"><span>p = 0</span><span class=\"scale prob\"></span><span>p = 1</span>");
        writer.Write("<span class=\"swatch unknown\"></span><span>not a number</span></div>\n");
        writer.Write($"<div class=\"legend\" id=\"legend-entropy\" hidden><span>0 nats</span><span class=\"scale entropy\"></span><span>{Number(entropyScale, "0.##")} nats or more</span>");
        writer.Write("<span class=\"swatch unknown\"></span><span>not a number</span></div>\n</div>\n");

        writer.Write($"<h2>Prompt</h2>\n<div class=\"prompt\">{Encode(report.Prompt)}</div>\n");
        writer.Write("<h2>Generated</h2>\n<div id=\"text\" class=\"text by-prob\">");
        for (int i = 0; i < report.Tokens.Count; i++)
        {
            WriteToken(writer, report.Tokens[i], i, entropyScale);
        }
        writer.Write("</div>\n<p class=\"hint\">Hover or focus (Tab) a token for its numbers and the alternatives the model weighed. ");
        writer.Write("↵ marks a newline, ∅ a token that adds no text of its own (its bytes are completed by a later token).</p>\n");
        writer.Write("</main>\n<div id=\"tip\" role=\"tooltip\" hidden></div>\n");

        writer.Write("<script type=\"application/json\" id=\"report-data\">");
        using (var json = new MemoryStream())
        {
            report.WriteJson(json, JavaScriptEncoder.Default, indented: false);
            writer.Write(Encoding.UTF8.GetString(json.GetBuffer(), 0, (int)json.Length));
        }
        writer.Write($"</script>\n<script>{Script}</script>\n</body>\n</html>\n");
    }

    private static void Figure(TextWriter writer, string name, string value, string note) =>
        writer.Write($"<div><dt>{Encode(name)}</dt><dd>{Encode(value)}</dd><dd class=\"note\">{Encode(note)}</dd></div>\n");

    private static void WriteToken(TextWriter writer, ReportToken token, int index, double entropyScale)
    {
        var signals = token.Signals;
        var classes = new StringBuilder("t");
        if (token.Text.Length == 0)
        {
            classes.Append(" empty");
        }
        if (token.Text.Contains('\n', StringComparison.Ordinal))
        {
            classes.Append(" nl");
        }
        // --p and --h (entropy / scale, clamped to [0, 1]) drive the two colourings in CSS; a figure that is not
        // a number gets the grey of the legend's "not a number" instead.
        var style = new StringBuilder();
        if (float.IsFinite(signals.LogProbability))
        {
            style.Append(string.Create(CultureInfo.InvariantCulture, $"--p:{Math.Clamp(signals.Probability, 0f, 1f):0.####};"));
        }
        else
        {
            classes.Append(" p-nan");
        }
        if (float.IsFinite(signals.Entropy))
        {
            style.Append(string.Create(CultureInfo.InvariantCulture, $"--h:{Math.Clamp(signals.Entropy / entropyScale, 0, 1):0.####};"));
        }
        else
        {
            classes.Append(" h-nan");
        }
        writer.Write($"<span class=\"{classes}\" tabindex=\"0\" data-i=\"{index}\" style=\"{style}\" title=\"{Encode(Tooltip(token))}\">{Encode(token.Text)}</span>");
    }

    /// <summary>The plain-text tooltip (title attribute): what the scripted tooltip shows, for readers without JS.</summary>
    public static string Tooltip(ReportToken token)
    {
        var signals = token.Signals;
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"token {token.Id} {Visible(token.Text)}");
        if (token.Text.Length == 0)
        {
            text.Append(" (adds no text: a later token completes its character)");
        }
        text.Append('\n');
        text.Append(CultureInfo.InvariantCulture, $"p {Number(signals.Probability, "F4")} · log p {Number(signals.LogProbability, "F4")}\n");
        text.Append(CultureInfo.InvariantCulture,
            $"entropy {Number(signals.Entropy, "F4")} nats · kurtosis {Number(signals.Kurtosis, "F1")} · margin {Number(signals.Margin, "F4")}");
        if (token.Top.Count > 0)
        {
            text.Append("\ntop alternatives:");
            foreach (var alternative in token.Top)
            {
                text.Append(CultureInfo.InvariantCulture,
                    $"\n  {Number(MathF.Exp(alternative.LogProbability), "F4")}  {Visible(alternative.Text)}{(alternative.Id == token.Id ? "  (chosen)" : "")}");
            }
        }
        return text.ToString();
    }

    /// <summary>The entropy that gets the far end of the entropy colour scale: the largest entropy in the report,
    /// rounded up to a whole nat (at least 1), so that one report's colours use the whole scale.</summary>
    public static double EntropyScale(UncertaintyReport report)
    {
        ArgumentNullException.ThrowIfNull(report);
        double largest = 0;
        foreach (var token in report.Tokens)
        {
            if (float.IsFinite(token.Signals.Entropy))
            {
                largest = Math.Max(largest, token.Signals.Entropy);
            }
        }
        return Math.Max(1, Math.Ceiling(largest));
    }

    /// <summary>A token's text in quotes with its whitespace made visible (\n, \t, \r).</summary>
    private static string Visible(string text) =>
        "\"" + text.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\n", "\\n", StringComparison.Ordinal)
            .Replace("\r", "\\r", StringComparison.Ordinal).Replace("\t", "\\t", StringComparison.Ordinal) + "\"";

    private static string Number(double value, string format) =>
        double.IsFinite(value) ? value.ToString(format, CultureInfo.InvariantCulture) : "n/a";

    private static string Encode(string text) => WebUtility.HtmlEncode(text);

    // Probability: red (p = 0) through yellow to green (p = 1). Entropy: green (0 nats) to red (the scale's end).
    private const string Style = """

        :root { color-scheme: light; --ink: #1d2330; --muted: #5b6475; --line: #d9dee8; }
        body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--ink);
               margin: 0 auto; max-width: 60rem; padding: 1.5rem; background: #fff; }
        h1 { font-size: 1.4rem; margin: 0 0 .25rem; }
        h2 { font-size: 1rem; margin: 1.5rem 0 .5rem; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
        .meta { margin: 0 0 1rem; color: var(--muted); }
        .figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(11rem, 1fr)); gap: .75rem; margin: 0; }
        .figures div { border: 1px solid var(--line); border-radius: .5rem; padding: .6rem .8rem; background: #f7f9fc; }
        .figures dt { color: var(--muted); font-size: .85rem; }
        .figures dd { margin: 0; font-size: 1.35rem; font-weight: 600; font-variant-numeric: tabular-nums; }
        .figures dd.note { font-size: .8rem; font-weight: 400; color: var(--muted); }
        .controls { display: flex; flex-wrap: wrap; align-items: center; gap: 1rem; margin-top: 1.25rem; }
        fieldset { border: 1px solid var(--line); border-radius: .5rem; padding: .2rem .8rem .4rem; margin: 0; }
        fieldset label { margin-right: .8rem; cursor: pointer; }
        .legend { display: flex; align-items: center; gap: .5rem; font-size: .85rem; color: var(--muted); }
        .legend[hidden] { display: none; }
        .scale { display: inline-block; width: 10rem; height: .9rem; border-radius: .2rem; border: 1px solid var(--line); }
        .scale.prob { background: linear-gradient(to right, hsl(0 80% 78%), hsl(60 80% 78%), hsl(120 80% 78%)); }
        .scale.entropy { background: linear-gradient(to right, hsl(120 80% 78%), hsl(60 80% 78%), hsl(0 80% 78%)); }
        .swatch { display: inline-block; width: .9rem; height: .9rem; border-radius: .2rem; margin-left: .8rem; }
        .unknown { background: #c8ccd4; }
        .prompt, .text { white-space: pre-wrap; overflow-wrap: anywhere; font: 15px/1.9 ui-monospace, "DejaVu Sans Mono", monospace;
                         border: 1px solid var(--line); border-radius: .5rem; padding: .75rem 1rem; }
        .prompt { color: var(--muted); background: #fafafa; }
        .t { border-radius: .2rem; padding: .1rem 0; cursor: default; box-shadow: inset -1px 0 0 #fff; }
        .t:hover, .t:focus { outline: 2px solid var(--ink); outline-offset: 0; }
        .by-prob .t { background: hsl(calc(var(--p, 0) * 120) 80% 78%); }
        .by-entropy .t { background: hsl(calc((1 - var(--h, 0)) * 120) 80% 78%); }
        .by-prob .t.p-nan, .by-entropy .t.h-nan { background: #c8ccd4; }
        .t.nl::before { content: "\21B5"; color: var(--muted); }
        .t.empty::before { content: "\2205"; color: var(--muted); font-size: .75em; }
        .hint { font-size: .8rem; color: var(--muted); }
        #tip { position: fixed; z-index: 10; max-width: 24rem; background: #1d2330; color: #fff; border-radius: .4rem;
               padding: .5rem .7rem; font-size: .8rem; line-height: 1.4; box-shadow: 0 4px 14px rgba(0,0,0,.25); pointer-events: none; }
        #tip table { border-collapse: collapse; margin-top: .3rem; }
        #tip td { padding: 0 .4rem 0 0; white-space: nowrap; vertical-align: top; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
        #tip td:last-child { white-space: pre-wrap; overflow-wrap: anywhere; }
        #tip div { overflow-wrap: anywhere; }
        #tip .bar { display: inline-block; height: .55rem; background: #7fd88f; border-radius: .1rem; }
        #tip .chosen td { color: #ffe28a; }

        """;

    // Reads the embedded JSON; builds the tooltip with textContent only (never innerHTML with data).
    private const string Script = """

        (function () {
          "use strict";
          var data = JSON.parse(document.getElementById("report-data").textContent);
          var text = document.getElementById("text");
          var tip = document.getElementById("tip");
          function fmt(x, digits) { return typeof x === "number" ? x.toFixed(digits) : "n/a"; }
          function visible(s) { return JSON.stringify(s); }
          function el(tag, content) { var e = document.createElement(tag); if (content !== undefined) e.textContent = content; return e; }
          function setMode(mode) {
            text.className = "text by-" + mode;
            document.getElementById("legend-prob").hidden = mode !== "prob";
            document.getElementById("legend-entropy").hidden = mode !== "entropy";
          }
          // The URL's fragment (#prob, #entropy) picks the colouring, so a link or a screenshot can ask for one.
          document.querySelectorAll("input[name=mode]").forEach(function (input) {
            if (location.hash === "#" + input.value) input.checked = true;
            input.addEventListener("change", function () {
              if (!input.checked) return;
              setMode(input.value);
              try { history.replaceState(null, "", "#" + input.value); } catch (e) { /* some file: URLs refuse it */ }
            });
          });
          document.querySelectorAll("input[name=mode]").forEach(function (input) { if (input.checked) setMode(input.value); });
          function show(span) {
            var token = data.tokens[Number(span.dataset.i)];
            if (!token) return;
            tip.replaceChildren();
            tip.appendChild(el("div", "token " + token.token + " " + visible(token.text)));
            tip.appendChild(el("div", "p " + fmt(token.prob, 4) + " \u00b7 log p " + fmt(token.logprob, 4)));
            tip.appendChild(el("div", "entropy " + fmt(token.entropy, 4) + " nats \u00b7 kurtosis " + fmt(token.kurtosis, 1) +
              " \u00b7 margin " + fmt(token.margin, 4)));
            if (token.top.length > 0) {
              var table = el("table");
              token.top.forEach(function (alternative) {
                var p = typeof alternative.logprob === "number" ? Math.exp(alternative.logprob) : 0;
                var row = el("tr");
                if (alternative.token === token.token) row.className = "chosen";
                row.appendChild(el("td", fmt(p, 4)));
                var bar = el("span"); bar.className = "bar"; bar.style.width = (p * 6).toFixed(2) + "rem";
                var barCell = el("td"); barCell.appendChild(bar); row.appendChild(barCell);
                row.appendChild(el("td", visible(alternative.text)));
                table.appendChild(row);
              });
              tip.appendChild(table);
            }
            tip.hidden = false;
            var box = span.getBoundingClientRect();
            var left = Math.min(box.left, window.innerWidth - tip.offsetWidth - 8);
            var top = box.bottom + 6;
            if (top + tip.offsetHeight > window.innerHeight) top = Math.max(4, box.top - tip.offsetHeight - 6);
            tip.style.left = Math.max(4, left) + "px";
            tip.style.top = top + "px";
          }
          function hide() { tip.hidden = true; }
          // The scripted tooltip replaces the native one: the title moves to data-title, the span is described by the tip.
          text.querySelectorAll(".t").forEach(function (span) {
            span.dataset.title = span.title;
            span.removeAttribute("title");
            span.setAttribute("aria-describedby", "tip");
          });
          text.addEventListener("mouseover", function (e) { var t = e.target.closest(".t"); if (t) show(t); });
          text.addEventListener("mouseout", function (e) { if (e.target.closest(".t")) hide(); });
          text.addEventListener("focusin", function (e) { var t = e.target.closest(".t"); if (t) show(t); });
          text.addEventListener("focusout", hide);
          document.addEventListener("keydown", function (e) { if (e.key === "Escape") hide(); });
          text.dataset.enhanced = "true";
        })();

        """;
}
