using System.Buffers;
using System.Collections.Concurrent;
using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using KernelLM.Models;
using KernelLM.Models.Scoring;
using KernelLM.Runtime;
using KernelLM.Runtime.Signals;
using Spectre.Console;

namespace KernelLM.Cli;

/// <summary>
/// `kernellm score`: teacher-forced per-token numbers of texts under a model, optionally against a reference
/// model with the same tokenizer (<see cref="Scorer"/>).
///
///   --text TEXT                     one text: a table on stdout (or --json: one object per position)
///   --input IN.jsonl --output OUT.jsonl
///                                   one JSON object per non-blank input line, in order (see <see cref="WriteScore"/>);
///                                   a line that cannot be scored gets {"line": N, "error": "..."} and a
///                                   `line N: ...` message on stderr, and the rest are still scored.
///
/// OUT is written to a temporary file next to it as the lines are scored and renamed over OUT at the end, so
/// it is either absent (or its previous version) or complete. Exit code: 0 when every line scored, 1 when a
/// line failed or the command could not run (the summary on stderr says which).
/// </summary>
public static class ScoreCommand
{
    private static readonly JsonWriterOptions WriterOptions = new()
    {
        // JSONL for programs, never embedded in HTML: keep non-ASCII text readable instead of \u-escaped.
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    public static Command Create(TextWriter output, TextWriter errors)
    {
        var model = Program.ModelOption(required: true);
        var reference = new Option<string>("--reference") { Description = "Reference model folder with the same tokenizer: adds KL(p||q), KL(q||p) and log p - log q per token" };
        var text = new Option<string>("--text") { Description = "One text to score (exactly one of --text and --input)" };
        var json = new Option<bool>("--json") { Description = "With --text: one JSON object per line per position" };
        var input = new Option<string>("--input", "-i") { Description = "JSONL file: one object per line, the text in --field, an optional id" };
        var outputFile = new Option<string>("--output", "-o") { Description = "JSONL file to write (with --input): one result per input line, written atomically" };
        var field = new Option<string>("--field") { Description = "Input field that holds the text", DefaultValueFactory = _ => "text" };
        var topK = new Option<int>("--top-k") { Description = $"Most likely alternatives reported per position (0..{VocabStats.MaxTopK})", DefaultValueFactory = _ => 0 };
        var device = new Program.DeviceOptions();
        var command = new Command("score", "Per-token log-probs, entropies and kurtosis of texts under a model (KL against a reference model).")
        {
            model, reference, text, json, input, outputFile, field, topK,
        };
        device.AddTo(command);
        var kvSelect = new KvSelectOption();
        kvSelect.AddTo(command);
        command.SetAction(result => Program.Guard(result, errors, () =>
        {
            string? textValue = result.GetValue(text);
            string? inputPath = result.GetValue(input);
            string? outputPath = result.GetValue(outputFile);
            string fieldName = result.GetValue(field) ?? "text";
            int k = result.GetValue(topK);
            if ((textValue is null) == (inputPath is null))
            {
                throw new InvalidParameterException("--text / --input", "give exactly one of them");
            }
            if ((inputPath is null) != (outputPath is null))
            {
                throw new InvalidParameterException("--output", "--input and --output go together");
            }
            if ((uint)k > VocabStats.MaxTopK)
            {
                throw new InvalidParameterException("--top-k", $"{k} (must be 0..{VocabStats.MaxTopK})");
            }
            if (fieldName.Length == 0)
            {
                throw new InvalidParameterException("--field", "must not be empty");
            }
            if (inputPath is not null && !File.Exists(inputPath))
            {
                throw new InvalidParameterException("--input", $"{inputPath}: no such file");
            }
            if (outputPath is not null && !Directory.Exists(Path.GetDirectoryName(Path.GetFullPath(outputPath))))
            {
                throw new InvalidParameterException("--output", $"{outputPath}: its folder does not exist");
            }

            var options = device.Read(result);
            // Selection applies to the scored model only: the reference keeps full attention, so --reference on the same
            // folder measures what the selection changes (KL per position).
            using var language = Program.LoadWithProgress(result.GetValue(model)!, kvSelect.Apply(result, options), errors);
            string? referenceDirectory = result.GetValue(reference);
            using var referenceModel = referenceDirectory is null ? null : Program.LoadWithProgress(referenceDirectory, options, errors, shareDeviceWith: language);
            using var scorer = new Scorer(language, referenceModel, k);
            if (textValue is not null)
            {
                var score = scorer.Score(textValue);
                if (result.GetValue(json))
                {
                    WritePositionsJson(output, score);
                }
                else
                {
                    WriteTable(output, language, score);
                }
                return 0;
            }
            return ScoreFile(scorer, inputPath!, outputPath!, fieldName, errors);
        }));
        return command;
    }

    // ------------------------------------------------------------------ --text

    private static void WriteTable(TextWriter output, LanguageModel language, TextScore score)
    {
        string F(float value) => value.ToString("F4", CultureInfo.InvariantCulture);
        var table = new Table().AddColumns("position", "token", "text", "logprob", "entropy", "kurtosis", "margin");
        if (score.HasReference)
        {
            table.AddColumns("kl_pq", "kl_qp", "log_ratio");
        }
        bool hasTop = score.Positions.Any(p => p.Top.Count > 0);
        if (hasTop)
        {
            table.AddColumn("top");
        }
        foreach (var position in score.Positions)
        {
            var cells = new List<string>
            {
                position.Position.ToString(CultureInfo.InvariantCulture),
                position.Token.ToString(CultureInfo.InvariantCulture),
                Markup.Escape(language.Tokenizer.Decode([position.Token])),
                F(position.LogProbability), F(position.Entropy), position.Kurtosis.ToString("F1", CultureInfo.InvariantCulture), F(position.Margin),
            };
            if (score.HasReference)
            {
                cells.AddRange([F(position.KlPq), F(position.KlQp), F(position.LogRatio)]);
            }
            if (hasTop)
            {
                cells.Add(Markup.Escape(string.Join("  ", position.Top.Select(a =>
                    string.Create(CultureInfo.InvariantCulture, $"\"{language.Tokenizer.Decode([a.Id])}\" {a.LogProbability:F2}")))));
            }
            table.AddRow([.. cells]);
        }
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        if (Console.IsOutputRedirected || !ReferenceEquals(output, Console.Out))
        {
            console.Profile.Width = 240; // a file or pipe has no width to wrap at; Spectre would assume 80
        }
        console.Write(table);
        string summary = string.Create(CultureInfo.InvariantCulture,
            $"sum logprob {score.SumLogProbability:F4}, perplexity {score.Perplexity:F4}, mean entropy {score.MeanEntropy:F4}");
        if (score.HasReference)
        {
            summary += string.Create(CultureInfo.InvariantCulture,
                $", mean KL(p||q) {score.MeanKlPq:F4}, mean KL(q||p) {score.MeanKlQp:F4}, sum log ratio {score.SumLogRatio:F4}");
        }
        output.WriteLine(summary);
    }

    /// <summary>--text --json: {"position", "token", "logprob", "entropy", "kurtosis", "margin"[, "kl_pq", "kl_qp", "log_ratio"][, "top"]} per line.</summary>
    private static void WritePositionsJson(TextWriter output, TextScore score)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using var writer = new Utf8JsonWriter(buffer, WriterOptions);
        foreach (var position in score.Positions)
        {
            buffer.ResetWrittenCount();
            writer.Reset();
            writer.WriteStartObject();
            writer.WriteNumber("position", position.Position);
            writer.WriteNumber("token", position.Token);
            WriteNumber(writer, "logprob", position.LogProbability);
            WriteNumber(writer, "entropy", position.Entropy);
            WriteNumber(writer, "kurtosis", position.Kurtosis);
            WriteNumber(writer, "margin", position.Margin);
            if (score.HasReference)
            {
                WriteNumber(writer, "kl_pq", position.KlPq);
                WriteNumber(writer, "kl_qp", position.KlQp);
                WriteNumber(writer, "log_ratio", position.LogRatio);
            }
            if (position.Top.Count > 0)
            {
                writer.WriteStartArray("top");
                foreach (var alternative in position.Top)
                {
                    writer.WriteStartObject();
                    writer.WriteNumber("id", alternative.Id);
                    WriteNumber(writer, "logprob", alternative.LogProbability);
                    writer.WriteEndObject();
                }
                writer.WriteEndArray();
            }
            writer.WriteEndObject();
            writer.Flush();
            output.WriteLine(Encoding.UTF8.GetString(buffer.WrittenSpan));
        }
    }

    // ------------------------------------------------------------------ --input / --output

    private sealed class Counters
    {
        private long _lines;
        private long _tokens;

        public long Lines => Interlocked.Read(ref _lines);
        public long Tokens => Interlocked.Read(ref _tokens);
        public int Failed { get; set; }

        public void Add(int tokens)
        {
            Interlocked.Add(ref _tokens, tokens);
            Interlocked.Increment(ref _lines);
        }
    }

    private static int ScoreFile(Scorer scorer, string inputPath, string outputPath, string field, TextWriter errors)
    {
        using var cancel = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) =>
        {
            e.Cancel = true;
            cancel.Cancel();
        };
        Console.CancelKeyPress += onCancel;
        var counters = new Counters();
        var clock = Stopwatch.StartNew();
        try
        {
            bool interactive = !Console.IsErrorRedirected && ReferenceEquals(errors, Console.Error);
            if (!interactive)
            {
                ScoreLines(scorer, inputPath, outputPath, field, errors.WriteLine, counters, cancel.Token);
            }
            else
            {
                RunWithProgress(scorer, inputPath, outputPath, field, counters, cancel.Token);
            }
        }
        catch (OperationCanceledException)
        {
            errors.WriteLine($"cancelled after {counters.Lines} lines; {outputPath} was not written");
            return 1;
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
        }
        double seconds = clock.Elapsed.TotalSeconds;
        long scored = counters.Lines - counters.Failed;
        string withReference = scorer.HasReference ? " (with the reference model)" : "";
        string summary = string.Create(CultureInfo.InvariantCulture,
            $"scored {scored} of {counters.Lines} lines ({counters.Tokens} tokens) in {seconds:F2} s, {counters.Tokens / Math.Max(seconds, 1e-9):F1} tokens/s{withReference}; wrote {outputPath}");
        if (counters.Failed > 0)
        {
            errors.WriteLine($"{summary}; {counters.Failed} line(s) failed (\"error\" lines in the output)");
            return 1;
        }
        errors.WriteLine(summary);
        return 0;
    }

    /// <summary>
    /// Scores on a worker thread; if that takes longer than a moment, shows a progress bar on stderr (a terminal).
    /// Every message goes through this thread: through the bar's console while it is shown, so they print above it.
    /// </summary>
    private static void RunWithProgress(Scorer scorer, string inputPath, string outputPath, string field, Counters counters, CancellationToken cancellation)
    {
        var messages = new ConcurrentQueue<string>();
        var clock = Stopwatch.StartNew();
        var work = Task.Run(() => ScoreLines(scorer, inputPath, outputPath, field, messages.Enqueue, counters, cancellation), cancellation);
        // Waits on `done` never throw (Task.Wait would wrap the worker's exception in an AggregateException);
        // the worker's own exception is rethrown as is at the end.
        var done = work.ContinueWith(_ => { }, CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });
        bool barShown = false;
        void Drain()
        {
            while (messages.TryDequeue(out string? message))
            {
                if (barShown)
                {
                    console.WriteLine(message); // through the live display, which redraws the bar below it
                }
                else
                {
                    Console.Error.WriteLine(message);
                }
            }
        }
        if (!done.Wait(TimeSpan.FromMilliseconds(400), CancellationToken.None))
        {
            Drain();
            barShown = true;
            int total = File.ReadLines(inputPath).Count(line => !string.IsNullOrWhiteSpace(line));
            console.Progress().AutoClear(true).Start(context =>
            {
                var task = context.AddTask("scoring", maxValue: Math.Max(total, 1));
                while (!done.Wait(TimeSpan.FromMilliseconds(100), CancellationToken.None))
                {
                    Drain();
                    task.Value = counters.Lines;
                    task.Description = string.Create(CultureInfo.InvariantCulture,
                        $"scoring {counters.Lines}/{total} lines, {counters.Tokens / Math.Max(clock.Elapsed.TotalSeconds, 1e-9):F0} tokens/s");
                }
                task.Value = counters.Lines;
                Drain();
            });
            barShown = false;
        }
        Drain();
        work.GetAwaiter().GetResult();
    }

    private static void ScoreLines(Scorer scorer, string inputPath, string outputPath, string field, Action<string> report, Counters counters,
        CancellationToken cancellation)
    {
        using var lines = new AtomicJsonLines(outputPath);
        int lineNumber = 0;
        foreach (string line in File.ReadLines(inputPath))
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line))
            {
                continue;
            }
            cancellation.ThrowIfCancellationRequested();
            string? error = ScoreLine(scorer, line, lineNumber, field, lines, out int tokens);
            if (error is not null)
            {
                counters.Failed++;
                report($"line {lineNumber}: {error}");
            }
            counters.Add(tokens);
        }
        lines.Commit();
    }

    /// <summary>Scores one input line and writes its output line; returns the error written instead, if any.</summary>
    private static string? ScoreLine(Scorer scorer, string line, int lineNumber, string field, AtomicJsonLines lines, out int tokens)
    {
        tokens = 0;
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(line);
        }
        catch (JsonException error)
        {
            return WriteError(lines, null, lineNumber, $"invalid JSON: {error.Message}");
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
            {
                return WriteError(lines, null, lineNumber, $"a JSON {root.ValueKind.ToString().ToLowerInvariant()}, not an object");
            }
            JsonElement? id = root.TryGetProperty("id", out var idValue) ? idValue : null;
            if (!root.TryGetProperty(field, out var textValue))
            {
                return WriteError(lines, id, lineNumber, $"no \"{field}\" field");
            }
            if (textValue.ValueKind != JsonValueKind.String)
            {
                return WriteError(lines, id, lineNumber, $"\"{field}\" is a {textValue.ValueKind.ToString().ToLowerInvariant()}, not a string");
            }
            TextScore score;
            try
            {
                score = scorer.Score(textValue.GetString()!);
            }
            catch (KernelLMException error)
            {
                return WriteError(lines, id, lineNumber, error.Message);
            }
            WriteScore(lines.Begin(), id, lineNumber, score);
            lines.End();
            tokens = score.Positions.Count;
            return null;
        }
    }

    private static string WriteError(AtomicJsonLines lines, JsonElement? id, int lineNumber, string message)
    {
        var writer = lines.Begin();
        writer.WriteStartObject();
        if (id is { } value)
        {
            writer.WritePropertyName("id");
            value.WriteTo(writer);
        }
        writer.WriteNumber("line", lineNumber);
        writer.WriteString("error", message);
        writer.WriteEndObject();
        lines.End();
        return message;
    }

    /// <summary>
    /// One output line: "id" (the input's, copied as is, when it has one), "line" (1-based line number in the
    /// input), "tokens" (all ids, BOS included), then per position i >= 1 (arrays one shorter than "tokens"):
    /// "logprobs", "entropies", "kurtosis", "margins", with a reference "kl_pq", "kl_qp", "log_ratio", with
    /// --top-k "top_ids" and "top_logprobs" (arrays of k per position); then "sum_logprob", "perplexity",
    /// "mean_entropy" and with a reference "mean_kl_pq", "mean_kl_qp", "sum_log_ratio". Non-finite numbers are null.
    /// </summary>
    private static void WriteScore(Utf8JsonWriter writer, JsonElement? id, int lineNumber, TextScore score)
    {
        var positions = score.Positions;
        writer.WriteStartObject();
        if (id is { } value)
        {
            writer.WritePropertyName("id");
            value.WriteTo(writer);
        }
        writer.WriteNumber("line", lineNumber);
        writer.WriteStartArray("tokens");
        foreach (int token in score.Tokens)
        {
            writer.WriteNumberValue(token);
        }
        writer.WriteEndArray();
        WriteColumn(writer, "logprobs", positions, p => p.LogProbability);
        WriteColumn(writer, "entropies", positions, p => p.Entropy);
        WriteColumn(writer, "kurtosis", positions, p => p.Kurtosis);
        WriteColumn(writer, "margins", positions, p => p.Margin);
        if (score.HasReference)
        {
            WriteColumn(writer, "kl_pq", positions, p => p.KlPq);
            WriteColumn(writer, "kl_qp", positions, p => p.KlQp);
            WriteColumn(writer, "log_ratio", positions, p => p.LogRatio);
        }
        if (positions.Count > 0 && positions[0].Top.Count > 0)
        {
            writer.WriteStartArray("top_ids");
            foreach (var position in positions)
            {
                writer.WriteStartArray();
                foreach (var alternative in position.Top)
                {
                    writer.WriteNumberValue(alternative.Id);
                }
                writer.WriteEndArray();
            }
            writer.WriteEndArray();
            writer.WriteStartArray("top_logprobs");
            foreach (var position in positions)
            {
                writer.WriteStartArray();
                foreach (var alternative in position.Top)
                {
                    WriteNumberValue(writer, alternative.LogProbability);
                }
                writer.WriteEndArray();
            }
            writer.WriteEndArray();
        }
        WriteNumber(writer, "sum_logprob", score.SumLogProbability);
        WriteNumber(writer, "perplexity", score.Perplexity);
        WriteNumber(writer, "mean_entropy", score.MeanEntropy);
        if (score.HasReference)
        {
            WriteNumber(writer, "mean_kl_pq", score.MeanKlPq);
            WriteNumber(writer, "mean_kl_qp", score.MeanKlQp);
            WriteNumber(writer, "sum_log_ratio", score.SumLogRatio);
        }
        writer.WriteEndObject();
    }

    private static void WriteColumn(Utf8JsonWriter writer, string name, IReadOnlyList<TokenScore> positions, Func<TokenScore, float> select)
    {
        writer.WriteStartArray(name);
        foreach (var position in positions)
        {
            WriteNumberValue(writer, select(position));
        }
        writer.WriteEndArray();
    }

    private static void WriteNumberValue(Utf8JsonWriter writer, float value)
    {
        if (float.IsFinite(value))
        {
            writer.WriteNumberValue(value);
        }
        else
        {
            writer.WriteNullValue();
        }
    }

    private static void WriteNumber(Utf8JsonWriter writer, string name, float value)
    {
        writer.WritePropertyName(name);
        WriteNumberValue(writer, value);
    }

    private static void WriteNumber(Utf8JsonWriter writer, string name, double value)
    {
        if (double.IsFinite(value))
        {
            writer.WriteNumber(name, value);
        }
        else
        {
            writer.WriteNull(name);
        }
    }

    /// <summary>
    /// JSON lines streamed to a temporary file in the destination's folder (same file system, so the final rename
    /// is atomic) and renamed over the destination by <see cref="Commit"/>; disposed without a commit, the
    /// temporary file is deleted and the destination left as it was.
    /// </summary>
    private sealed class AtomicJsonLines : IDisposable
    {
        private readonly string _path;
        private readonly string _temporaryPath;
        private readonly FileStream _stream;
        private readonly Utf8JsonWriter _writer;
        private bool _committed;

        public AtomicJsonLines(string path)
        {
            _path = Path.GetFullPath(path);
            _temporaryPath = Path.Combine(Path.GetDirectoryName(_path)!, $".{Path.GetFileName(_path)}.{Guid.NewGuid():N}.tmp");
            _stream = new FileStream(_temporaryPath, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 1 << 16);
            _writer = new Utf8JsonWriter(_stream, WriterOptions);
        }

        /// <summary>The writer for one line's value (one JSON object).</summary>
        public Utf8JsonWriter Begin()
        {
            _writer.Reset();
            return _writer;
        }

        public void End()
        {
            _writer.Flush();
            _stream.WriteByte((byte)'\n');
        }

        public void Commit()
        {
            _writer.Dispose(); // flushes; disposing it after the stream would flush into a closed stream
            _stream.Flush(flushToDisk: true);
            _stream.Dispose();
            File.Move(_temporaryPath, _path, overwrite: true);
            _committed = true;
        }

        public void Dispose()
        {
            _writer.Dispose();
            _stream.Dispose();
            if (!_committed)
            {
                File.Delete(_temporaryPath);
            }
        }
    }
}
