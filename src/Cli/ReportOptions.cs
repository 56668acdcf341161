using System.CommandLine;
using System.Text;
using KernelLM.Models;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Signals;

namespace KernelLM.Cli;

public enum ReportFormat
{
    Html,
    Json,
}

/// <summary>One report to write: its format and its full path.</summary>
public sealed record ReportTarget(ReportFormat Format, string Path);

/// <summary>
/// `--report html=PATH` / `--report json=PATH` (repeatable) and `--report-top-k N` on run and generate. Reports turn
/// on per-token signals. Everything about the targets is checked before the model loads: the syntax, and that
/// each path's folder exists and takes a new file; the files are written atomically at the end.
/// </summary>
public sealed class ReportOptions
{
    public const int DefaultTopK = 5;

    public Option<string[]> Report { get; } = new("--report")
    {
        Description = "Write an uncertainty report of the generation: html=PATH or json=PATH (repeatable)",
        AllowMultipleArgumentsPerToken = false,
    };

    public Option<int> TopK { get; } = new("--report-top-k")
    {
        Description = $"Alternatives per token in reports (0..{VocabStats.MaxTopK})",
        DefaultValueFactory = _ => DefaultTopK,
    };

    public void AddTo(Command command)
    {
        command.Options.Add(Report);
        command.Options.Add(TopK);
    }

    /// <summary>The requested reports, checked; null when none was asked for.</summary>
    public ReportRequest? Read(ParseResult result)
    {
        int topK = result.GetValue(TopK);
        if ((uint)topK > VocabStats.MaxTopK)
        {
            throw new InvalidParameterException("--report-top-k", $"{topK} (must be 0..{VocabStats.MaxTopK})");
        }
        string[] values = result.GetValue(Report) ?? [];
        if (values.Length == 0)
        {
            return null;
        }
        var targets = new List<ReportTarget>(values.Length);
        foreach (string value in values)
        {
            var target = Parse(value);
            if (targets.Any(t => t.Path == target.Path))
            {
                throw new InvalidParameterException("--report", $"{value}: {target.Path} is named twice");
            }
            CheckWritable(value, target.Path);
            targets.Add(target);
        }
        return new ReportRequest(targets, topK);
    }

    public static ReportTarget Parse(string value)
    {
        ArgumentNullException.ThrowIfNull(value);
        int equals = value.IndexOf('=', StringComparison.Ordinal);
        if (equals < 0)
        {
            throw new InvalidParameterException("--report", $"'{value}' has no '=' (expected html=PATH or json=PATH)");
        }
        string kind = value[..equals];
        string path = value[(equals + 1)..];
        ReportFormat format = kind.ToLowerInvariant() switch
        {
            "html" => ReportFormat.Html,
            "json" => ReportFormat.Json,
            _ => throw new InvalidParameterException("--report", $"'{value}': unknown format '{kind}' (expected html=PATH or json=PATH)"),
        };
        if (string.IsNullOrWhiteSpace(path))
        {
            throw new InvalidParameterException("--report", $"'{value}': the path is empty");
        }
        return new ReportTarget(format, Path.GetFullPath(path));
    }

    /// <summary>Fails before any generation when the report cannot be written: no such folder, the path is a folder,
    /// or the folder takes no new file (probed by creating and deleting a temporary file there).</summary>
    private static void CheckWritable(string value, string path)
    {
        if (Directory.Exists(path))
        {
            throw new InvalidParameterException("--report", $"'{value}': {path} is a folder");
        }
        string folder = Path.GetDirectoryName(path)!;
        if (!Directory.Exists(folder))
        {
            throw new InvalidParameterException("--report", $"'{value}': the folder {folder} does not exist");
        }
        try
        {
            using var probe = new FileStream(ReportWriter.TemporaryPath(path), FileMode.CreateNew, FileAccess.Write, FileShare.None, 1, FileOptions.DeleteOnClose);
        }
        catch (Exception error) when (error is IOException or UnauthorizedAccessException)
        {
            throw new InvalidParameterException("--report", $"'{value}': cannot write in {folder}: {error.Message}");
        }
    }
}

/// <summary>The reports one run writes, and the signals they need.</summary>
public sealed record ReportRequest(IReadOnlyList<ReportTarget> Targets, int TopK)
{
    public TokenSignalOptions Signals => new() { TopK = TopK };

    /// <summary>A collector for the streamed tokens; the report names the model by its folder.</summary>
    public static UncertaintyReportBuilder Collect(LanguageModel model, string prompt)
    {
        ArgumentNullException.ThrowIfNull(model);
        return new UncertaintyReportBuilder(model.Tokenizer, Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(model.Directory))), prompt);
    }

    /// <summary>Writes every target and names each on <paramref name="errors"/>.</summary>
    public void Write(UncertaintyReport report, TextWriter errors)
    {
        ArgumentNullException.ThrowIfNull(errors);
        foreach (var target in Targets)
        {
            ReportWriter.Write(report, target);
            errors.WriteLine($"report ({target.Format.ToString().ToLowerInvariant()}): {target.Path}");
        }
    }
}

/// <summary>Writes a report file atomically: into a temporary file in the same folder, flushed to disk, then renamed
/// over the target, so a reader never sees a half-written report and a failure leaves the old file in place.</summary>
public static class ReportWriter
{
    public static void Write(UncertaintyReport report, ReportTarget target)
    {
        ArgumentNullException.ThrowIfNull(report);
        ArgumentNullException.ThrowIfNull(target);
        string temporary = TemporaryPath(target.Path);
        try
        {
            using (var stream = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                if (target.Format == ReportFormat.Json)
                {
                    report.WriteJson(stream);
                }
                else
                {
                    using var writer = new StreamWriter(stream, new UTF8Encoding(encoderShouldEmitUTF8Identifier: false), leaveOpen: true);
                    UncertaintyReportHtml.Write(report, writer);
                }
                stream.Flush(flushToDisk: true);
            }
            File.Move(temporary, target.Path, overwrite: true);
        }
        catch (Exception error) when (error is IOException or UnauthorizedAccessException)
        {
            TryDelete(temporary);
            throw new KernelLMException($"cannot write the report {target.Path}: {error.Message}", error);
        }
        catch
        {
            TryDelete(temporary);
            throw;
        }
    }

    /// <summary>A hidden, unique file next to <paramref name="path"/> (same folder, so the rename stays on one file system).</summary>
    public static string TemporaryPath(string path) =>
        Path.Combine(Path.GetDirectoryName(path)!, $".{Path.GetFileName(path)}.{Guid.NewGuid():N}.tmp");

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception error) when (error is IOException or UnauthorizedAccessException)
        {
            // Nothing more to do: the report's own error is the one to show.
        }
    }
}
