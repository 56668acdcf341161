using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace KernelLM.Runtime.Generation;

/// <summary>One teacher-forced step: the entropy (nats) of the model's next-token distribution and whether the
/// reference token was the model's top-1 (greedy would have been right).</summary>
public readonly record struct CalibrationStep(float Entropy, bool GreedyCorrect);

/// <summary>A learned entropy threshold and how it was found; the JSON saved beside the model
/// (<see cref="EntropyCalibration.FileName"/>), read by <c>threshold=auto</c>.</summary>
public sealed record EntropyThreshold
{
    public const string CurrentFormat = "kernellm-entropy-threshold/1";

    [JsonRequired, JsonPropertyName("format")] public string Format { get; init; } = CurrentFormat;

    /// <summary>Greedy below it, lookahead at or above it (nats).</summary>
    [JsonRequired, JsonPropertyName("entropy_threshold")] public float Threshold { get; init; }

    /// <summary>The probability cut-off on P(greedy correct | entropy) that maximised held-out accuracy.</summary>
    [JsonPropertyName("cutoff")] public double Cutoff { get; init; }

    /// <summary>P(greedy correct | H) = sigmoid(intercept + slope x H).</summary>
    [JsonPropertyName("intercept")] public double Intercept { get; init; }
    [JsonPropertyName("slope")] public double Slope { get; init; }

    /// <summary>Accuracy of "greedy is right iff H &lt; threshold" on the held-out steps.</summary>
    [JsonPropertyName("heldout_accuracy")] public double HeldOutAccuracy { get; init; }
    [JsonPropertyName("training_steps")] public int TrainingSteps { get; init; }
    [JsonPropertyName("heldout_steps")] public int HeldOutSteps { get; init; }

    /// <summary>Fraction of all steps whose reference token was the top-1.</summary>
    [JsonPropertyName("greedy_correct_fraction")] public double GreedyCorrectFraction { get; init; }
    [JsonPropertyName("texts")] public int Texts { get; init; }
    [JsonPropertyName("model")] public string Model { get; init; } = "";
}

/// <summary>
/// Learns the adaptive-decoding threshold as AdaDec does (docs/adaptive-decoding.md): a logistic regression of
/// "greedy is right" on the entropy with balanced class weights, fitted on the training steps; the probability
/// cut-off (0.01 .. 0.99 in steps of 0.01) with the best accuracy on the held-out steps (every
/// <see cref="HeldOutEvery"/>-th step); and that cut-off turned back into an entropy:
/// H* = (logit(cutoff) - intercept) / slope. The regression has two parameters, so it is written out here
/// (Newton's method on the weighted log-loss) rather than taken from a library.
/// </summary>
public static class EntropyCalibration
{
    public const string FileName = "adaptive-decoding.json";
    public const int HeldOutEvery = 5;

    /// <summary>Ridge on the standardised slope, relative to the total weight: keeps the fit finite when the
    /// classes are separable (a threshold between them is then still found), negligible otherwise.</summary>
    public const double Ridge = 1e-6;

    private static readonly JsonSerializerOptions s_json = new() { WriteIndented = true };

    public static string PathFor(string modelDirectory) => Path.Combine(modelDirectory, FileName);

    /// <summary>
    /// Fits P(y = 1 | x) = sigmoid(intercept + slope x) by weighted maximum likelihood, each class weighted by
    /// n / (2 n_class) (balanced). x is standardised for the Newton iterations and the result mapped back.
    /// </summary>
    public static (double Intercept, double Slope) FitLogistic(ReadOnlySpan<float> x, ReadOnlySpan<bool> y)
    {
        if (x.Length != y.Length)
        {
            throw new ArgumentException($"{x.Length} values and {y.Length} labels");
        }
        int n = x.Length;
        int positives = 0;
        double mean = 0;
        for (int i = 0; i < n; i++)
        {
            positives += y[i] ? 1 : 0;
            mean += x[i];
        }
        if (positives == 0 || positives == n)
        {
            throw new InvalidParameterException("calibration data",
                $"all {n} training steps are {(positives == 0 ? "greedy errors" : "greedy hits")}; the regression needs both (use more or other texts)");
        }
        mean /= n;
        double variance = 0;
        for (int i = 0; i < n; i++)
        {
            variance += (x[i] - mean) * (x[i] - mean);
        }
        double scale = Math.Sqrt(variance / n);
        if (!(scale > 0) || !double.IsFinite(scale))
        {
            throw new InvalidParameterException("calibration data", $"the {n} training entropies are all equal (or not finite); nothing to regress on");
        }
        double positiveWeight = n / (2.0 * positives);
        double negativeWeight = n / (2.0 * (n - positives));
        double ridge = Ridge * n;
        double alpha = 0, beta = 0;
        for (int iteration = 0; iteration < 200; iteration++)
        {
            double g0 = 0, g1 = ridge * beta, h00 = 1e-12 * n, h01 = 0, h11 = ridge;
            for (int i = 0; i < n; i++)
            {
                double z = (x[i] - mean) / scale;
                double p = Sigmoid(alpha + beta * z);
                double w = y[i] ? positiveWeight : negativeWeight;
                double residual = w * (p - (y[i] ? 1 : 0));
                double curvature = w * p * (1 - p);
                g0 += residual;
                g1 += residual * z;
                h00 += curvature;
                h01 += curvature * z;
                h11 += curvature * z * z;
            }
            double determinant = h00 * h11 - h01 * h01;
            double step0 = (h11 * g0 - h01 * g1) / determinant;
            double step1 = (h00 * g1 - h01 * g0) / determinant;
            alpha -= step0;
            beta -= step1;
            if (Math.Abs(step0) + Math.Abs(step1) < 1e-12 * (1 + Math.Abs(alpha) + Math.Abs(beta)))
            {
                break;
            }
        }
        return (alpha - beta * mean / scale, beta / scale);
    }

    /// <summary>Fits on every step but the held-out ones (index % <see cref="HeldOutEvery"/> == HeldOutEvery - 1),
    /// picks the cut-off on those and returns the threshold (clamped at 0 nats).</summary>
    public static EntropyThreshold Calibrate(IReadOnlyList<CalibrationStep> steps, int texts = 0, string model = "")
    {
        ArgumentNullException.ThrowIfNull(steps);
        int heldOutCount = steps.Count / HeldOutEvery;
        if (heldOutCount < 1)
        {
            throw new InvalidParameterException("calibration data", $"{steps.Count} steps; at least {HeldOutEvery} are needed (every {HeldOutEvery}th is held out)");
        }
        var trainX = new float[steps.Count - heldOutCount];
        var trainY = new bool[trainX.Length];
        var heldOut = new CalibrationStep[heldOutCount];
        int t = 0, h = 0, correct = 0;
        for (int i = 0; i < steps.Count; i++)
        {
            correct += steps[i].GreedyCorrect ? 1 : 0;
            if (i % HeldOutEvery == HeldOutEvery - 1 && h < heldOutCount)
            {
                heldOut[h++] = steps[i];
            }
            else
            {
                trainX[t] = steps[i].Entropy;
                trainY[t++] = steps[i].GreedyCorrect;
            }
        }
        var (intercept, slope) = FitLogistic(trainX, trainY);
        if (!(slope < 0))
        {
            throw new InvalidParameterException("calibration data",
                $"the fitted slope is {slope.ToString("G4", CultureInfo.InvariantCulture)} >= 0: on these texts a higher entropy does not make greedy errors more likely, so no threshold separates them");
        }
        double bestCutoff = 0, bestAccuracy = -1;
        float bestThreshold = 0;
        for (int percent = 1; percent <= 99; percent++)
        {
            double cutoff = percent / 100.0;
            float threshold = ThresholdFor(cutoff, intercept, slope);
            int right = 0;
            foreach (var step in heldOut)
            {
                right += (step.Entropy < threshold) == step.GreedyCorrect ? 1 : 0;
            }
            double accuracy = right / (double)heldOut.Length;
            // Ties keep the lowest cut-off: the highest threshold, so the fewest lookahead steps.
            if (accuracy > bestAccuracy)
            {
                bestAccuracy = accuracy;
                bestCutoff = cutoff;
                bestThreshold = threshold;
            }
        }
        return new EntropyThreshold
        {
            Threshold = bestThreshold,
            Cutoff = bestCutoff,
            Intercept = intercept,
            Slope = slope,
            HeldOutAccuracy = bestAccuracy,
            TrainingSteps = trainX.Length,
            HeldOutSteps = heldOut.Length,
            GreedyCorrectFraction = correct / (double)steps.Count,
            Texts = texts,
            Model = model,
        };
    }

    /// <summary>The entropy at which sigmoid(intercept + slope H) = cutoff, clamped at 0.</summary>
    public static float ThresholdFor(double cutoff, double intercept, double slope) =>
        (float)Math.Max(0, (Math.Log(cutoff / (1 - cutoff)) - intercept) / slope);

    /// <summary>Writes the threshold file atomically (a temporary file in the same folder, renamed over it).</summary>
    public static void Save(EntropyThreshold threshold, string path)
    {
        ArgumentNullException.ThrowIfNull(threshold);
        string full = Path.GetFullPath(path);
        string folder = Path.GetDirectoryName(full)!;
        if (!Directory.Exists(folder))
        {
            throw new InvalidParameterException("output", $"{path}: its folder does not exist");
        }
        string temporary = Path.Combine(folder, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");
        try
        {
            File.WriteAllText(temporary, JsonSerializer.Serialize(threshold, s_json) + "\n");
            File.Move(temporary, full, overwrite: true);
        }
        catch
        {
            File.Delete(temporary);
            throw;
        }
    }

    /// <summary>Reads a threshold file; a missing file or a bad field is an error naming the file.</summary>
    public static EntropyThreshold Read(string path)
    {
        if (!File.Exists(path))
        {
            throw new InvalidParameterException("adaptive-decoding threshold",
                $"auto reads {path}, which does not exist: run `kernellm calibrate-entropy --model DIR --input FILE.jsonl` first, or give threshold=H");
        }
        EntropyThreshold? threshold;
        try
        {
            threshold = JsonSerializer.Deserialize<EntropyThreshold>(File.ReadAllText(path));
        }
        catch (JsonException error)
        {
            throw new ModelConfigException($"{path}: not a threshold file ({error.Message})", error);
        }
        if (threshold is null || threshold.Format != EntropyThreshold.CurrentFormat)
        {
            throw new ModelConfigException($"{path}: field \"format\" must be \"{EntropyThreshold.CurrentFormat}\"");
        }
        if (!float.IsFinite(threshold.Threshold) || threshold.Threshold < 0)
        {
            throw new ModelConfigException($"{path}: field \"entropy_threshold\" is {threshold.Threshold} (must be a finite entropy >= 0)");
        }
        return threshold;
    }

    private static double Sigmoid(double value) => value >= 0 ? 1 / (1 + Math.Exp(-value)) : Math.Exp(value) / (1 + Math.Exp(value));
}
