using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using KernelLM.Models.Calibration;
using KernelLM.Runtime;
using KernelLM.Runtime.Generation;

namespace KernelLM.Cli;

/// <summary>
/// `kernellm calibrate-entropy --model DIR --input FILE.jsonl [--field text] [--output PATH]`: learns the adaptive-decoding
/// entropy threshold from reference texts (<see cref="EntropyCalibrator"/>, <see cref="EntropyCalibration"/>), prints it
/// and saves it beside the model (DIR/adaptive-decoding.json, written atomically; --output elsewhere), where
/// `--adaptive-decoding threshold=auto` reads it. The input is read whole before the model loads: a line that is not
/// a JSON object with a string in --field is an error naming the line, and nothing is written.
/// </summary>
public static class CalibrateEntropyCommand
{
    public static Command Create(TextWriter output, TextWriter errors)
    {
        var model = Program.ModelOption(required: true);
        var input = new Option<string>("--input", "-i") { Description = "JSONL file of reference texts: one object per line, the text in --field", Required = true };
        var field = new Option<string>("--field") { Description = "Input field that holds the text", DefaultValueFactory = _ => "text" };
        var outputFile = new Option<string>("--output", "-o") { Description = $"Where to save the threshold (default: {EntropyCalibration.FileName} in the model folder)" };
        var device = new Program.DeviceOptions();
        var command = new Command("calibrate-entropy",
            "Learn the adaptive-decoding entropy threshold from reference texts (logistic regression of greedy hits on the entropy) and save it beside the model.")
        {
            model, input, field, outputFile,
        };
        device.AddTo(command);
        command.SetAction(result => Program.Guard(result, errors, () =>
        {
            string directory = result.GetValue(model)!;
            string inputPath = result.GetValue(input)!;
            string fieldName = result.GetValue(field) ?? "text";
            if (fieldName.Length == 0)
            {
                throw new InvalidParameterException("--field", "must not be empty");
            }
            if (!File.Exists(inputPath))
            {
                throw new InvalidParameterException("--input", $"{inputPath}: no such file");
            }
            string target = result.GetValue(outputFile) ?? EntropyCalibration.PathFor(directory);
            if (!Directory.Exists(Path.GetDirectoryName(Path.GetFullPath(target))))
            {
                throw new InvalidParameterException("--output", $"{target}: its folder does not exist");
            }
            var texts = ReadTexts(inputPath, fieldName);
            using var language = Program.LoadWithProgress(directory, device.Read(result), errors);
            var threshold = EntropyCalibrator.Calibrate(language, texts);
            EntropyCalibration.Save(threshold, target);
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"entropy threshold: {threshold.Threshold:F4} nats"));
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"P(greedy right | H) = sigmoid({threshold.Intercept:F4} + {threshold.Slope:F4} H); cut-off {threshold.Cutoff:F2}, held-out accuracy {threshold.HeldOutAccuracy:F4}"));
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{threshold.Texts} texts, {threshold.TrainingSteps} training and {threshold.HeldOutSteps} held-out steps, greedy right at {threshold.GreedyCorrectFraction:P1} of them"));
            errors.WriteLine($"saved {Path.GetFullPath(target)}");
            return 0;
        }));
        return command;
    }

    /// <summary>The texts of a JSONL file (blank lines skipped); a bad line is an error naming it.</summary>
    public static List<string> ReadTexts(string path, string field)
    {
        var texts = new List<string>();
        int number = 0;
        foreach (string line in File.ReadLines(path))
        {
            number++;
            if (string.IsNullOrWhiteSpace(line))
            {
                continue;
            }
            try
            {
                using var document = JsonDocument.Parse(line);
                if (document.RootElement.ValueKind != JsonValueKind.Object
                    || !document.RootElement.TryGetProperty(field, out var value) || value.ValueKind != JsonValueKind.String)
                {
                    throw new InvalidParameterException("--input", $"{path} line {number}: not an object with a string \"{field}\"");
                }
                texts.Add(value.GetString()!);
            }
            catch (JsonException error)
            {
                throw new InvalidParameterException("--input", $"{path} line {number}: invalid JSON ({error.Message})");
            }
        }
        if (texts.Count == 0)
        {
            throw new InvalidParameterException("--input", $"{path}: no texts");
        }
        return texts;
    }
}
